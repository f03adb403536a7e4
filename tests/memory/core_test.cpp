// memory/core: status and error types, checks, dtype validation, logging, CPU-mode probing.
#include <gtest/gtest.h>

#include "memory/core/check.h"
#include "memory/core/cuda_raii.h"
#include "memory/core/dtype.h"
#include "memory/core/log.h"
#include "tests/common/test_util.h"

namespace kvtier {
namespace {

TEST(Status, OkAndErrors) {
  Status ok = Status::ok();
  EXPECT_TRUE(ok.is_ok());
  EXPECT_EQ(ok.to_string(), "ok");
  ok.throw_if_error();

  Status full = Status::capacity("arena full");
  EXPECT_FALSE(full.is_ok());
  EXPECT_EQ(full.code(), StatusCode::kCapacity);
  EXPECT_EQ(full.to_string(), "capacity: arena full");
  EXPECT_THROW(full.throw_if_error(), CapacityError);
  EXPECT_THROW(Status::not_found("x").throw_if_error(), NotFoundError);
  EXPECT_THROW(Status::invalid_argument("x").throw_if_error(), InvalidArgumentError);
  EXPECT_THROW(Status::timeout("x").throw_if_error(), Error);
}

TEST(Check, ThrowsInvalidArgumentNamingTheValue) {
  const int head_dim = 96;
  try {
    KVTIER_CHECK(head_dim == 128, "head_dim ", head_dim, " is wrong");
    FAIL() << "no throw";
  } catch (const InvalidArgumentError& e) {
    EXPECT_EQ(e.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("head_dim 96 is wrong"), std::string::npos) << e.what();
  }
  EXPECT_THROW(KVTIER_CHECK_CODE(kCapacity, false, "full"), CapacityError);
  EXPECT_THROW(KVTIER_CHECK_CODE(kNotFound, false, "gone"), NotFoundError);
  EXPECT_NO_THROW(KVTIER_CHECK(true, "never"));
}

TEST(Check, AssertAborts) { EXPECT_DEATH(KVTIER_ASSERT(1 + 1 == 3), "internal assertion"); }

TEST(DType, ParseAndValidate) {
  EXPECT_EQ(parse_dtype("bf16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("float16"), DType::kF16);
  EXPECT_EQ(parse_dtype("fp32"), DType::kF32);
  EXPECT_THROW(parse_dtype("int8"), InvalidArgumentError);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(kv_row_bytes(DType::kBF16, 128), 256u);
  for (int d : {64, 128, 256}) {
    EXPECT_NO_THROW(check_kv_row_shape(DType::kF16, d));
    EXPECT_NO_THROW(check_kv_row_shape(DType::kBF16, d));
    EXPECT_NO_THROW(check_kv_row_shape(DType::kF32, d));
  }
  EXPECT_EQ(kv_row_bytes(DType::kF32, 64), 256u);
  try {
    check_kv_row_shape(DType::kBF16, 96);
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim 96"), std::string::npos) << e.what();
  }
  try {
    check_kv_row_shape(static_cast<DType>(7), 128);  // e.g. a value from a bad FFI cast
    FAIL();
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("not supported"), std::string::npos) << e.what();
  }
}

TEST(Log, SinkReceivesMessagesAtOrAboveLevel) {
  std::vector<std::string> got;
  LogSink old = set_log_sink([&](LogLevel, const std::string& m) { got.push_back(m); });
  const LogLevel old_level = log_level();
  set_log_level(LogLevel::kWarn);
  KVTIER_LOG(kWarn, "pinning refused for ", 42, " bytes");
  KVTIER_LOG(kDebug, "not shown");
  set_log_level(old_level);
  set_log_sink(old);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], "pinning refused for 42 bytes");
}

TEST(Cuda, ProbeIsConsistent) {
  // Either there is a device (and a description naming it) or the probe says why not.
  const bool avail = cuda::device_available();
  EXPECT_EQ(avail, cuda::device_count() > 0);
  const std::string d = cuda::device_description(0);
  if (!avail) {
    EXPECT_NE(d.find("no CUDA device"), std::string::npos) << d;
    EXPECT_THROW(cuda::Stream(0), CudaError);
    EXPECT_THROW(cuda::DeviceAllocation(1024, 0), CudaError);
  } else {
    EXPECT_EQ(d.find("no CUDA device"), std::string::npos) << d;
  }
}

}  // namespace
}  // namespace kvtier
