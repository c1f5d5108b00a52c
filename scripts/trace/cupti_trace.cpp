// A kernel timeline of any CUDA program, for finding where a step's time goes when
// Nsight Systems is not at hand: loaded with LD_PRELOAD, it records every kernel and
// memcpy (peer copies too) through CUPTI's activity API and writes one CSV per process,
// $TRACE_OUT.<rank>.csv (rank from OMPI_COMM_WORLD_RANK), rows
// start_ns,end_ns,stream,K|M,correlation,name. With TRACE_API=1 it also records the host's
// CUDA runtime and driver calls, rows start_ns,end_ns,thread,A,correlation,name: a kernel
// or copy has the correlation of the call that queued it, so scripts/trace/step.py can
// tell a GPU that waited for the host from one that waited for other work.
// Build: g++ -O2 -shared -fPIC -I$CUDA/include cupti_trace.cpp -o libtrace.so
//          -L$CUDA/targets/x86_64-linux/lib -lcupti
// Records reach the file as CUPTI fills its buffers and at exit; a program that exits
// without running static destructors loses the last buffer.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace {

FILE* g_out = nullptr;
std::mutex g_mutex;
constexpr size_t kBufferBytes = 8 << 20;

void check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return;
  const char* message = nullptr;
  cuptiGetResultString(result, &message);
  std::fprintf(stderr, "cupti_trace: %s failed: %s\n", what, message ? message : "?");
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = kBufferBytes;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(g_mutex);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      std::string name = k->name ? k->name : "?";
      for (char& c : name) c = c == ',' ? ';' : c;
      std::fprintf(g_out, "%llu,%llu,%u,K,%u,%s\n", static_cast<unsigned long long>(k->start),
                   static_cast<unsigned long long>(k->end), k->streamId, k->correlationId,
                   name.c_str());
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      std::fprintf(g_out, "%llu,%llu,%u,M,%u,memcpy kind %d %llu bytes\n",
                   static_cast<unsigned long long>(m->start),
                   static_cast<unsigned long long>(m->end), m->streamId, m->correlationId,
                   int(m->copyKind), static_cast<unsigned long long>(m->bytes));
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY2) {  // into another GPU's memory
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpyPtoP4*>(record);
      std::fprintf(g_out, "%llu,%llu,%u,M,%u,memcpy to device %u %llu bytes\n",
                   static_cast<unsigned long long>(m->start),
                   static_cast<unsigned long long>(m->end), m->streamId, m->correlationId,
                   m->dstDeviceId, static_cast<unsigned long long>(m->bytes));
    } else if (record->kind == CUPTI_ACTIVITY_KIND_RUNTIME ||
               record->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(record);
      const char* name = nullptr;
      cuptiGetCallbackName(record->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? CUPTI_CB_DOMAIN_RUNTIME_API
                                                                       : CUPTI_CB_DOMAIN_DRIVER_API,
                           a->cbid, &name);
      std::fprintf(g_out, "%llu,%llu,%u,A,%u,%s\n", static_cast<unsigned long long>(a->start),
                   static_cast<unsigned long long>(a->end), a->threadId, a->correlationId,
                   name ? name : "?");
    }
  }
  std::free(buffer);
}

__attribute__((constructor)) void start_trace() {
  const char* base = std::getenv("TRACE_OUT");
  if (!base) return;
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  const std::string path = std::string(base) + "." + (rank ? rank : "0") + ".csv";
  g_out = std::fopen(path.c_str(), "w");
  if (!g_out) {
    std::fprintf(stderr, "cupti_trace: cannot write %s\n", path.c_str());
    return;
  }
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
        "cuptiActivityRegisterCallbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "enabling kernel records");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "enabling memcpy records");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY2), "enabling peer memcpy records");
  const char* api = std::getenv("TRACE_API");
  if (api && std::string(api) == "1") {
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME), "enabling runtime call records");
    check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER), "enabling driver call records");
  }
}

__attribute__((destructor)) void finish_trace() {
  if (!g_out) return;
  check(cuptiActivityFlushAll(1), "cuptiActivityFlushAll");
  std::fclose(g_out);
}

}  // namespace
