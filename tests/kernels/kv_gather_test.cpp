// CPU reference of the fetch gather: exact placement, untouched bytes stay untouched, bad params.
#include "kernels/kv_gather.h"

#include <gtest/gtest.h>

#include <cstring>

#include "tests/common/test_util.h"

namespace kvtier::kernels {
namespace {

TEST(GatherRef, PlacesRowsAndTouchesNothingElse) {
  const int32_t rb = 128, P = 5, pages = 7;
  std::mt19937_64 rng(test::test_seed());
  std::vector<std::byte> src_k = test::random_bytes(rb * 40, rng),
                         src_v = test::random_bytes(rb * 40, rng);
  std::vector<std::byte> k(rb * P * pages, std::byte{0xEE}), v(k.size(), std::byte{0xEE});
  std::vector<memory::GatherSegment> segs = {
      {src_k.data(), src_v.data(), 3, 0, 5, 0},
      {src_k.data() + 5 * rb, src_v.data() + 5 * rb, 0, 2, 3, 0},
      {src_k.data() + 30 * rb, src_v.data() + 30 * rb, 6, 4, 1, 0},
  };
  gather_ref({segs.data(), 3, rb, P, k.data(), v.data()});
  std::vector<std::byte> want_k(k.size(), std::byte{0xEE}), want_v(v.size(), std::byte{0xEE});
  for (const auto& s : segs) {
    const size_t off = (static_cast<size_t>(s.dst_page) * P + s.dst_row) * rb;
    std::memcpy(want_k.data() + off, s.src_k, static_cast<size_t>(s.num_rows) * rb);
    std::memcpy(want_v.data() + off, s.src_v, static_cast<size_t>(s.num_rows) * rb);
  }
  EXPECT_EQ(test::first_difference(k.data(), want_k.data(), k.size()), -1);
  EXPECT_EQ(test::first_difference(v.data(), want_v.data(), v.size()), -1);
}

TEST(GatherRef, RejectsBadParams) {
  std::vector<std::byte> pool(4096);
  memory::GatherSegment s{pool.data(), pool.data(), 0, 3, 2, 0};
  EXPECT_THROW(gather_ref({&s, 1, 100, 4, pool.data(), pool.data()}), InvalidArgumentError);
  EXPECT_THROW(gather_ref({&s, 1, 128, 4, pool.data(), pool.data()}), InvalidArgumentError);
  EXPECT_THROW(gather_ref({nullptr, 1, 128, 4, pool.data(), pool.data()}), InvalidArgumentError);
  EXPECT_NO_THROW(gather_ref({&s, 0, 128, 4, pool.data(), pool.data()}));
}

}  // namespace
}  // namespace kvtier::kernels
