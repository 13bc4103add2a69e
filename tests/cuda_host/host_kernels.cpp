// A launcher for any `extern "C" __global__` kernel of cuda/ on the host runtime: the test side
// (hostbuild.py) writes host_unity.cu (the chosen kernel files, one translation unit as in the
// real build) and host_kernel_list.inc (HORIZON_HOST_KERNEL(name) per kernel); a launch names
// the kernel and passes its arguments as the Python ops build them for native.launch, each in a
// 64-bit slot with its kind (p pointer, i i32, l i64, f f32), checked against the C signature.
#include "host_runtime.h"

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "host_unity.cu"

namespace {
template <class T>
constexpr char kind_of() {
  if constexpr (std::is_pointer_v<T>)
    return 'p';
  else if constexpr (std::is_same_v<T, float>)
    return 'f';
  else if constexpr (std::is_same_v<T, long long> || std::is_same_v<T, long>)
    return 'l';
  else if constexpr (std::is_same_v<T, int> || std::is_same_v<T, unsigned>)
    return 'i';
  else
    return '?';
}

template <class T>
T unpack(unsigned long long s) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(static_cast<uintptr_t>(s));
  } else if constexpr (std::is_same_v<T, float>) {
    const unsigned u = (unsigned)s;
    float f;
    memcpy(&f, &u, 4);
    return f;
  } else {
    return static_cast<T>(static_cast<long long>(s));
  }
}

struct Entry {
  const char* name;
  std::string kinds;
  std::function<void(const unsigned long long*)> call;
};

template <class... A, size_t... I>
Entry make(const char* name, void (*k)(A...), std::index_sequence<I...>) {
  return Entry{name, std::string{kind_of<A>()...},
               [k](const unsigned long long* v) { k(unpack<A>(v[I])...); }};
}
template <class... A>
Entry make(const char* name, void (*k)(A...)) {
  return make(name, k, std::index_sequence_for<A...>{});
}

#define HORIZON_HOST_KERNEL(name) make(#name, &name),
const std::vector<Entry>& registry() {
  static const std::vector<Entry> r{
#include "host_kernel_list.inc"
  };
  return r;
}
}  // namespace

// Returns the number of failed blocks (deadlocked, or still running after limit_s seconds), or
// -1: unknown kernel, -2: argument kinds differ from the signature (the expected kinds are
// copied to `expect`, 64 bytes). Only the first `resident` blocks start (see launch()).
extern "C" int horizon_host_launch(const char* name, unsigned grid, unsigned block, unsigned long long smem,
                                   const char* kinds, const unsigned long long* vals, char* expect, double limit_s,
                                   unsigned resident) {
  for (const Entry& e : registry()) {
    if (strcmp(e.name, name) != 0) continue;
    if (e.kinds != kinds) {
      snprintf(expect, 64, "%s", e.kinds.c_str());
      return -2;
    }
    std::vector<unsigned long long> v(vals, vals + e.kinds.size());
    return horizon_host::launch(grid, block, (size_t)smem, [&] { e.call(v.data()); }, limit_s, resident);
  }
  return -1;
}
