// Linked into every test binary of the ThreadSanitizer build only. oneTBB's scheduler lives in
// libtbb.so, which distributions do not build with TSan, so TSan cannot see the happens-before
// edges of task spawn and steal and reports every access made by a TBB worker (to our inputs and
// to TBB's own task objects) as a race. Under TSan, TBB algorithms therefore run on the calling
// thread; concurrency among our own threads (the store, the cache, their locks and TBB's
// header-only containers) is still fully checked.
#include <oneapi/tbb/global_control.h>

namespace {
const oneapi::tbb::global_control g_tsan_single_thread(
    oneapi::tbb::global_control::max_allowed_parallelism, 1);
}  // namespace
