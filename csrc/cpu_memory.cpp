// Reusing the CPU memory of large tensors (cmfast/memory.py says why and when).
//
// A fresh tensor of 32 MiB or more comes from mmap and goes back to the OS when freed (glibc never serves such sizes
// from its heap), so every such tensor a U-Net forward creates is page-faulted in again, page by page: on 2 cores of
// a virtual machine a fresh 1x256x256x256 bf16 tensor costs 5 ms of faults before its first write, more than the op
// that fills it (an add: 1.5 ms). While a scope is active (cpu_memory_enter/exit) this allocator stands in for
// torch's CPU allocator: a request of kLarge bytes or more gets a block of its size class back from the blocks freed
// before (no faults), or a new one aligned to 2 MiB with transparent huge pages asked for (512x fewer faults where
// the OS grants them; size classes: size_class); smaller requests go to c10::alloc_cpu, as torch's own allocator does. A freed large block is
// kept while the blocks kept stay within the cap, wherever and whenever the tensor dies (its deleter is this file's),
// and freed when a whole scope went by without a request for it.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace cmfast {
namespace {

constexpr size_t kLarge = size_t{4} << 20;     // below it glibc's heap reuses memory by itself
constexpr size_t kHugePage = size_t{2} << 20;   // the alignment, and the size step from kCoarse up
constexpr size_t kCoarse = size_t{16} << 20;    // from here size classes step by kHugePage (at most 1/8 unused)
constexpr size_t kFine = size_t{256} << 10;     // below it by kFine (at most 1/16 unused)

size_t size_class(size_t nbytes) {
  const size_t step = nbytes >= kCoarse ? kHugePage : kFine;
  return (nbytes + step - 1) / step * step;
}

struct Kept {
  void* data;
  uint64_t scope;  // the scope count when it was freed
};

struct Pool {
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;   // large blocks in use -> their size class
  std::multimap<size_t, Kept> kept;         // large blocks free for reuse, by size class
  size_t kept_bytes = 0;
  size_t cap_bytes = 0;
  int64_t depth = 0;                        // active scopes (any thread)
  uint64_t scopes = 0;                      // outermost scopes entered so far
  c10::Allocator* previous = nullptr;       // torch's allocator, put back when the last scope ends
  int64_t reused = 0, fresh = 0;
};

Pool& pool() {
  static Pool* p = [] {
    Pool* fresh = new Pool;  // never destroyed: tensors may outlive every scope and free into it at exit
    // fork() while another thread holds the lock would leave it held for ever in the child (a DataLoader's workers):
    // the lock is taken around the fork, and released on both sides.
    pthread_atfork([] { pool().mutex.lock(); }, [] { pool().mutex.unlock(); }, [] { pool().mutex.unlock(); });
    return fresh;
  }();
  return *p;
}

void release(void* data) {
  Pool& p = pool();
  bool large = false;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.live.find(data);
    if (it != p.live.end()) {
      large = true;
      const size_t bytes = it->second;
      p.live.erase(it);
      if (p.kept_bytes + bytes <= p.cap_bytes) {
        p.kept.emplace(bytes, Kept{data, p.scopes});
        p.kept_bytes += bytes;
        return;
      }
    }
  }
  if (large) {
    std::free(data);  // over the cap
  } else {
    c10::free_cpu(data);  // a small block, from c10::alloc_cpu
  }
}

class ReusingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* data = nbytes >= kLarge ? large(nbytes) : c10::alloc_cpu(nbytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  static void* large(size_t nbytes) {
    const size_t bytes = size_class(nbytes);
    Pool& p = pool();
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      auto it = p.kept.find(bytes);
      if (it != p.kept.end()) {
        void* data = it->second.data;
        p.kept.erase(it);
        p.kept_bytes -= bytes;
        p.live.emplace(data, bytes);
        ++p.reused;
        return data;
      }
    }
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, bytes) != 0) {
      trim();  // the kept blocks may be what stands in the way
      if (posix_memalign(&data, kHugePage, bytes) != 0) throw std::bad_alloc();
    }
#ifdef MADV_HUGEPAGE
    madvise(data, bytes, MADV_HUGEPAGE);  // advice only: refused where THP is off, which is fine
#endif
    std::lock_guard<std::mutex> lock(p.mutex);
    p.live.emplace(data, bytes);
    ++p.fresh;
    return data;
  }

 public:
  static void trim() {
    std::vector<void*> freed;
    {
      Pool& p = pool();
      std::lock_guard<std::mutex> lock(p.mutex);
      for (auto& block : p.kept) freed.push_back(block.second.data);
      p.kept.clear();
      p.kept_bytes = 0;
    }
    for (void* data : freed) std::free(data);
  }

  // Frees the kept blocks that no request took during the scope now ending (kept before it began): sizes the
  // forward no longer makes (another batch, the layout measurement's other layout) are not held on for ever.
  static void trim_idle(Pool& p, std::vector<void*>& freed) {
    for (auto it = p.kept.begin(); it != p.kept.end();) {
      if (it->second.scope < p.scopes) {
        freed.push_back(it->second.data);
        p.kept_bytes -= it->first;
        it = p.kept.erase(it);
      } else {
        ++it;
      }
    }
  }
};

ReusingAllocator& allocator() {
  static ReusingAllocator* a = new ReusingAllocator;  // referenced by the deleters of tensors alive at exit
  return *a;
}

}  // namespace

bool cpu_memory_enter(int64_t cap_bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.cap_bytes = static_cast<size_t>(cap_bytes < 0 ? 0 : cap_bytes);
  if (p.depth++ == 0) {
    ++p.scopes;
    p.previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&allocator(), /*priority=*/0);  // refused where an allocator of higher priority is set
  }
  return c10::GetCPUAllocator() == &allocator();
}

void cpu_memory_exit() {
  Pool& p = pool();
  std::vector<void*> freed;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (p.depth > 0 && --p.depth == 0) {
      if (c10::GetCPUAllocator() == &allocator()) c10::SetCPUAllocator(p.previous, /*priority=*/0);
      ReusingAllocator::trim_idle(p, freed);
    }
  }
  for (void* data : freed) std::free(data);
}

void cpu_memory_trim() { ReusingAllocator::trim(); }

std::map<std::string, int64_t> cpu_memory_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  int64_t live_bytes = 0;
  for (auto& block : p.live) live_bytes += static_cast<int64_t>(block.second);
  return {{"kept_bytes", static_cast<int64_t>(p.kept_bytes)}, {"kept_blocks", static_cast<int64_t>(p.kept.size())},
          {"live_bytes", live_bytes}, {"live_blocks", static_cast<int64_t>(p.live.size())},
          {"cap_bytes", static_cast<int64_t>(p.cap_bytes)}, {"reused", p.reused}, {"fresh", p.fresh},
          {"active", c10::GetCPUAllocator() == &allocator() ? 1 : 0}};
}

}  // namespace cmfast
