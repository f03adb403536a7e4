// kvtier._core: kvtier::Engine for Python, with DLPack tensors at its boundary.
//
// Tensors arrive as nb::ndarray without constraints, so nanobind never converts or copies them: a
// torch tensor (CPU or CUDA) is passed zero-copy by its data pointer. Every tensor is checked here
// against the engine (dtype, device, shape, layout) so a mistake is a ValueError that names the
// argument, not a crash inside a kernel. The engine's own errors map to Python exceptions by kind:
// InvalidArgumentError -> ValueError, CapacityError -> MemoryError, NotFoundError -> KeyError,
// anything else -> RuntimeError. Engine calls run without the GIL; each makes its engine's device
// current itself (kvtier::Engine does, for a model spread over several GPUs).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "memory/core/cuda_raii.h"
#include "memory/core/status.h"
#include "scheduler/engine.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier {
namespace {

using Tensor = nb::ndarray<>;

[[noreturn]] void bad(const std::string& message) { throw nb::value_error(message.c_str()); }

nb::dlpack::dtype dlpack_dtype(DType t) {
  switch (t) {
    case DType::kF16:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
    case DType::kBF16:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
    case DType::kF32:
      return {static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};
  }
  return {};
}

std::string describe_dtype(nb::dlpack::dtype d) {
  std::ostringstream os;
  switch (static_cast<nb::dlpack::dtype_code>(d.code)) {
    case nb::dlpack::dtype_code::Float:
      os << "float";
      break;
    case nb::dlpack::dtype_code::Bfloat:
      os << "bfloat";
      break;
    case nb::dlpack::dtype_code::Int:
      os << "int";
      break;
    case nb::dlpack::dtype_code::UInt:
      os << "uint";
      break;
    case nb::dlpack::dtype_code::Bool:
      return "bool";
    default:
      os << "dtype code " << static_cast<int>(d.code) << " bits ";
  }
  os << static_cast<int>(d.bits);
  return os.str();
}

std::string describe_shape(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.shape(i);
  os << "]";
  return os.str();
}

/// Wraps an Engine with the checks of its tensor arguments.
class PyEngine {
 public:
  explicit PyEngine(const EngineConfig& config) {
    validate(config);
    engine_ = std::make_unique<Engine>(config);
  }

  /// Python collected the object. The GIL stays held, as it may be interpreter shutdown; the
  /// engine's background work, which the destructor waits for, never takes it.
  ~PyEngine() = default;
  PyEngine(const PyEngine&) = delete;
  PyEngine& operator=(const PyEngine&) = delete;

  const EngineConfig& config() const { return get().config(); }

  void add_sequence(SeqId seq) {
    Scope s(*this);
    engine_->add_sequence(seq);
  }
  void remove_sequence(SeqId seq) {
    Scope s(*this);
    engine_->remove_sequence(seq);
  }
  bool contains(SeqId seq) const { return get().contains(seq); }
  int64_t sequence_length(SeqId seq, int32_t layer) const {
    return get().sequence_length(seq, layer);
  }

  /// k, v: [num_kv_heads, rows, head_dim] of one sequence, any head and row strides (in elements)
  /// as long as K and V share them and a row is contiguous. q_window: [num_q_heads, w, head_dim]
  /// contiguous, the last prompt queries (clusterattn and hybrid need them; other modes ignore).
  void prefill_layer(SeqId seq, int32_t layer, const Tensor& k, const Tensor& v,
                     std::optional<Tensor> q_window, uintptr_t stream) {
    const ModelShape& m = config().model;
    check_tensor("k", k, {m.num_kv_heads, -1, m.head_dim}, /*contiguous=*/false);
    check_tensor("v", v, {m.num_kv_heads, -1, m.head_dim}, /*contiguous=*/false);
    if (k.shape(1) != v.shape(1)) {
      bad("prefill_layer: k has " + std::to_string(k.shape(1)) + " rows and v " +
          std::to_string(v.shape(1)));
    }
    // The stride of an extent-1 dimension is meaningless (torch reports various values for
    // it), so it is replaced by what a dense layout would have before K and V are compared.
    const int64_t num_rows = static_cast<int64_t>(k.shape(1));
    const auto strides = [&](const Tensor& t) {
      const int64_t row = num_rows > 1 ? t.stride(1) : m.head_dim;
      const int64_t head = m.num_kv_heads > 1 ? t.stride(0) : num_rows * row;
      return std::make_pair(head, row);
    };
    const auto [head_stride, row_stride] = strides(k);
    if (strides(v) != std::make_pair(head_stride, row_stride)) {
      bad("prefill_layer: k and v must have the same strides (make both contiguous)");
    }
    if (k.stride(2) != 1 || v.stride(2) != 1 || head_stride < 0 || row_stride < 0) {
      bad("prefill_layer: each row of k and v must be contiguous (stride 1 along head_dim) with "
          "non-negative head and row strides");
    }
    memory::KvRows rows;
    rows.k = k.data();
    rows.v = v.data();
    rows.dtype = m.dtype;
    rows.num_kv_heads = m.num_kv_heads;
    rows.head_dim = m.head_dim;
    rows.num_rows = num_rows;
    rows.head_stride = head_stride;
    rows.row_stride = row_stride;
    ObservationWindow window;
    if (q_window) {
      check_tensor("q_window", *q_window, {m.num_q_heads, -1, m.head_dim}, /*contiguous=*/true);
      window.q = q_window->data();
      window.num_queries = static_cast<int32_t>(q_window->shape(1));
    }
    Scope s(*this);
    engine_->prefill_layer(seq, layer, rows, window, to_stream(stream));
  }

  /// q, out: [B, num_q_heads, head_dim]; k_new, v_new: [B, num_kv_heads, head_dim]; all
  /// contiguous. seqs: the B sequence ids, in batch order.
  void decode_layer(int32_t layer, const std::vector<SeqId>& seqs, const Tensor& q,
                    const Tensor& k_new, const Tensor& v_new, const Tensor& out, uintptr_t stream,
                    std::optional<Tensor> lse) {
    const ModelShape& m = config().model;
    const int64_t b = static_cast<int64_t>(seqs.size());
    if (b == 0) bad("decode_layer: seqs is empty");
    check_tensor("q", q, {b, m.num_q_heads, m.head_dim}, true);
    check_tensor("k_new", k_new, {b, m.num_kv_heads, m.head_dim}, true);
    check_tensor("v_new", v_new, {b, m.num_kv_heads, m.head_dim}, true);
    check_tensor("out", out, {b, m.num_q_heads, m.head_dim}, true);
    DecodeBatch batch;
    batch.seqs = seqs.data();
    batch.num_seqs = static_cast<int32_t>(b);
    batch.q = q.data();
    batch.k_new = k_new.data();
    batch.v_new = v_new.data();
    batch.out = out.data();
    if (lse) {
      check_tensor("lse", *lse, {b, m.num_q_heads}, true, DType::kF32);
      batch.lse = static_cast<float*>(lse->data());
    }
    Scope s(*this);
    engine_->decode_layer(layer, batch, to_stream(stream));
  }

  std::vector<std::vector<int32_t>> last_selection(SeqId seq, int32_t layer) {
    Scope s(*this);  // it may wait for the step's policy job: without the GIL
    return engine_->last_selection(seq, layer);
  }

  void end_step(uintptr_t stream) {
    Scope s(*this);
    engine_->end_step(to_stream(stream));
  }
  void synchronize() {
    Scope s(*this);
    engine_->synchronize();
  }
  EngineStats stats() const { return get().stats(); }
  void start_trace(const std::string& path) {
    Scope s(*this);
    engine_->start_trace(path);
  }
  void stop_trace() {
    Scope s(*this);
    engine_->stop_trace();
  }
  bool tracing() const { return get().tracing(); }
  bool is_recall_layer(int32_t layer) const { return get().is_recall_layer(layer); }

  /// Destroys the engine now (waits for its background work) rather than when Python collects
  /// the object.
  void close() {
    Scope s(*this);
    engine_.reset();
  }
  bool closed() const { return engine_ == nullptr; }

 private:
  /// What every engine call needs: the engine still open, and the GIL released.
  class Scope {
   public:
    explicit Scope(PyEngine& e) {
      if (!e.engine_) throw std::runtime_error("kvtier: the engine was closed");
    }

   private:
    nb::gil_scoped_release release_;
  };

  Engine& get() const {
    if (!engine_) throw std::runtime_error("kvtier: the engine was closed");
    return *engine_;
  }

  static cudaStream_t to_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

  /// Checks dtype, device, shape (-1: any extent) and, if `contiguous`, a row-major layout.
  /// `dtype`: the one the tensor must have, when not the model's.
  void check_tensor(const char* name, const Tensor& t, std::initializer_list<int64_t> shape,
                    bool contiguous, std::optional<DType> dtype = std::nullopt) const {
    const EngineConfig& c = get().config();
    const DType want_dtype = dtype.value_or(c.model.dtype);
    if (t.dtype() != dlpack_dtype(want_dtype)) {
      bad(std::string(name) + ": dtype " + describe_dtype(t.dtype()) + " does not match " +
          (dtype ? std::string("the required ") : std::string("the engine's ")) +
          dtype_name(want_dtype));
    }
    if (c.backend == Backend::kCpu) {
      if (t.device_type() != nb::device::cpu::value) {
        bad(std::string(name) + ": the engine runs on the CPU backend but the tensor is not in " +
            "host memory");
      }
    } else if (t.device_type() != nb::device::cuda::value || t.device_id() != c.device) {
      bad(std::string(name) + ": the engine runs on CUDA device " + std::to_string(c.device) +
          " but the tensor is " +
          (t.device_type() == nb::device::cuda::value
               ? "on CUDA device " + std::to_string(t.device_id())
               : std::string("not in CUDA device memory")));
    }
    if (t.ndim() != shape.size()) {
      bad(std::string(name) + ": expected " + std::to_string(shape.size()) + " dimensions, got " +
          describe_shape(t));
    }
    size_t i = 0;
    for (const int64_t want_extent : shape) {
      if (want_extent >= 0 && static_cast<int64_t>(t.shape(i)) != want_extent) {
        std::ostringstream os;
        os << name << ": shape " << describe_shape(t) << " does not match [";
        size_t j = 0;
        for (const int64_t e : shape) {
          os << (j++ ? ", " : "");
          if (e >= 0) {
            os << e;
          } else {
            os << "*";
          }
        }
        os << "]";
        bad(os.str());
      }
      ++i;
    }
    if (contiguous) {
      int64_t expect = 1;
      for (size_t d = t.ndim(); d-- > 0;) {
        if (t.shape(d) != 1 && t.stride(d) != expect) {
          bad(std::string(name) + ": must be contiguous (row-major), shape " + describe_shape(t));
        }
        expect *= static_cast<int64_t>(t.shape(d));
      }
    }
  }

  std::unique_ptr<Engine> engine_;
};

DType dtype_from_name(const std::string& s) { return parse_dtype(s); }

}  // namespace
}  // namespace kvtier

NB_MODULE(_core, m) {
  using namespace kvtier;
  m.doc() = "kvtier engine bindings (the KV cache of one model, in host and device tiers)";

  // The engine's error kinds as Python's built-in exceptions (see the file comment).
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const InvalidArgumentError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const CapacityError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const NotFoundError& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  m.def("built_with_cuda", &cuda::built_with_cuda,
        "True if this build has the CUDA backend (kernels compiled with nvcc).");
  m.def("cuda_device_count", &cuda::device_count,
        "CUDA devices visible to the engine (0 without).");

  nb::class_<EngineConfig>(m, "EngineConfig",
                           "kvtier::EngineConfig; mode, dtype and backend are given as strings.")
      .def(nb::init<>())
      .def_prop_rw(
          "num_layers", [](const EngineConfig& c) { return c.model.num_layers; },
          [](EngineConfig& c, int32_t v) { c.model.num_layers = v; })
      .def_prop_rw(
          "num_q_heads", [](const EngineConfig& c) { return c.model.num_q_heads; },
          [](EngineConfig& c, int32_t v) { c.model.num_q_heads = v; })
      .def_prop_rw(
          "num_kv_heads", [](const EngineConfig& c) { return c.model.num_kv_heads; },
          [](EngineConfig& c, int32_t v) { c.model.num_kv_heads = v; })
      .def_prop_rw(
          "head_dim", [](const EngineConfig& c) { return c.model.head_dim; },
          [](EngineConfig& c, int32_t v) { c.model.head_dim = v; })
      .def_prop_rw(
          "dtype", [](const EngineConfig& c) { return std::string(dtype_name(c.model.dtype)); },
          [](EngineConfig& c, const std::string& v) { c.model.dtype = dtype_from_name(v); },
          "'fp16', 'bf16' or 'fp32'")
      .def_prop_rw(
          "mode", [](const EngineConfig& c) { return std::string(mode_name(c.mode)); },
          [](EngineConfig& c, const std::string& v) { c.mode = parse_mode(v); },
          "'full', 'clusterkv', 'clusterattn' or 'hybrid'")
      .def_prop_rw(
          "backend", [](const EngineConfig& c) { return std::string(backend_name(c.backend)); },
          [](EngineConfig& c, const std::string& v) {
            if (v == "cpu") {
              c.backend = Backend::kCpu;
            } else if (v == "cuda") {
              c.backend = Backend::kCuda;
            } else {
              throw nb::value_error(("backend must be 'cpu' or 'cuda', got '" + v + "'").c_str());
            }
          },
          "'cpu' or 'cuda'")
      .def_rw("device", &EngineConfig::device)
      .def_rw("budget", &EngineConfig::budget)
      .def_rw("total_budget", &EngineConfig::total_budget)
      .def_rw("resident_budget", &EngineConfig::resident_budget)
      .def_rw("sink", &EngineConfig::sink)
      .def_rw("window", &EngineConfig::window)
      .def_rw("tokens_per_cluster", &EngineConfig::tokens_per_cluster)
      .def_rw("initial_clusters", &EngineConfig::initial_clusters)
      .def_rw("window_clusters", &EngineConfig::window_clusters)
      .def_rw("retention_steps", &EngineConfig::retention_steps)
      .def_rw("admit_window_clusters", &EngineConfig::admit_window_clusters)
      .def_rw("mean_key_scores", &EngineConfig::mean_key_scores)
      .def_rw("page_size", &EngineConfig::page_size)
      .def_rw("num_dense_layers", &EngineConfig::num_dense_layers)
      .def_rw("kmeans_iters", &EngineConfig::kmeans_iters)
      .def_rw("observation_window", &EngineConfig::observation_window)
      .def_rw("dbac_eps", &EngineConfig::dbac_eps)
      .def_rw("dbac_min_density_ratio", &EngineConfig::dbac_min_density_ratio)
      .def_rw("dbac_coverage", &EngineConfig::dbac_coverage)
      .def_rw("dbac_floor_fraction", &EngineConfig::dbac_floor_fraction)
      .def_rw("dbac_recent_share", &EngineConfig::dbac_recent_share)
      .def_rw("dbac_fill_recent", &EngineConfig::dbac_fill_recent)
      .def_rw("host_bytes_limit", &EngineConfig::host_bytes_limit)
      .def_rw("cache_bytes", &EngineConfig::cache_bytes)
      .def_rw("max_sequences", &EngineConfig::max_sequences)
      .def_rw("max_batch", &EngineConfig::max_batch)
      .def_rw("max_context", &EngineConfig::max_context)
      .def_rw("telemetry_path", &EngineConfig::telemetry_path)
      .def_rw("cuda_graphs", &EngineConfig::cuda_graphs)
      .def(
          "validate", [](const EngineConfig& c) { validate(c); },
          "Raises ValueError naming the first bad field.");

  nb::class_<EngineStats>(m, "EngineStats")
      .def_ro("steps", &EngineStats::steps)
      .def_ro("decode_layer_calls", &EngineStats::decode_layer_calls)
      .def_ro("sequences", &EngineStats::sequences)
      .def_ro("gpu_bytes", &EngineStats::gpu_bytes)
      .def_ro("gpu_kv_bytes", &EngineStats::gpu_kv_bytes)
      .def_ro("gpu_peak_bytes", &EngineStats::gpu_peak_bytes)
      .def_ro("host_bytes_used", &EngineStats::host_bytes_used)
      .def_ro("host_bytes_peak", &EngineStats::host_bytes_peak)
      .def_ro("prefill_cluster_ms", &EngineStats::prefill_cluster_ms)
      .def_ro("window_clusterings", &EngineStats::window_clusterings)
      .def_ro("window_admissions", &EngineStats::window_admissions)
      .def_ro("rows_attended", &EngineStats::rows_attended)
      .def_ro("decode_host_ms", &EngineStats::decode_host_ms)
      .def_ro("decode_blocked_ms", &EngineStats::decode_blocked_ms)
      .def_ro("graph_launches", &EngineStats::graph_launches)
      .def_ro("select_attend_layers", &EngineStats::select_attend_layers)
      .def_ro("recall_hits", &EngineStats::recall_hits)
      .def_ro("recall_misses", &EngineStats::recall_misses)
      .def_ro("host_read_bytes", &EngineStats::host_read_bytes)
      .def_ro("fill_bytes", &EngineStats::fill_bytes)
      .def_prop_ro("recall_hit_rate", &EngineStats::recall_hit_rate)
      .def_prop_ro("cache_evictions", [](const EngineStats& s) { return s.cache.evictions; });

  nb::class_<PyEngine>(m, "Engine", "kvtier::Engine: the KV cache of one model on one device.")
      .def(nb::init<const EngineConfig&>(), "config"_a)
      .def_prop_ro("config", &PyEngine::config)
      .def("add_sequence", &PyEngine::add_sequence, "seq"_a)
      .def("remove_sequence", &PyEngine::remove_sequence, "seq"_a)
      .def("contains", &PyEngine::contains, "seq"_a)
      .def("sequence_length", &PyEngine::sequence_length, "seq"_a, "layer"_a)
      .def("prefill_layer", &PyEngine::prefill_layer, "seq"_a, "layer"_a, "k"_a, "v"_a,
           "q_window"_a = nb::none(), "stream"_a = 0,
           "One layer's prompt K and V of one sequence ([num_kv_heads, rows, head_dim]).")
      .def("decode_layer", &PyEngine::decode_layer, "layer"_a, "seqs"_a, "q"_a, "k_new"_a,
           "v_new"_a, "out"_a, "stream"_a = 0, "lse"_a = nb::none(),
           "Appends each sequence's new K/V row and writes attention over its rows to out; lse "
           "([B, num_q_heads] float32), if given, receives the log-sum-exp of the scaled logits "
           "over the rows attended.")
      .def("last_selection", &PyEngine::last_selection, "seq"_a, "layer"_a,
           "Cluster ids per KV head that `layer` selected for `seq` in the last step that ended "
           "(empty for a layer that does not recall, or a sequence not decoded then).")
      .def("end_step", &PyEngine::end_step, "stream"_a = 0)
      .def("synchronize", &PyEngine::synchronize)
      .def("stats", &PyEngine::stats)
      .def("start_trace", &PyEngine::start_trace, "path"_a,
           "Writes every telemetry event to `path` from now on (JSON Lines, docs/telemetry.md); "
           "tools/kvtier-trace reads it.")
      .def("stop_trace", &PyEngine::stop_trace,
           "Waits for the traced work, writes what is left and closes the file.")
      .def_prop_ro("tracing", &PyEngine::tracing)
      .def("is_recall_layer", &PyEngine::is_recall_layer, "layer"_a)
      .def("close", &PyEngine::close)
      .def_prop_ro("closed", &PyEngine::closed);
}
