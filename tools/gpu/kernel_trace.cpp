// A kernel timeline for machines without Nsight Systems: a CUPTI injection library that records
// every kernel's start and end (graph replays included, PDL overlap kept) and writes them as CSV
// at exit. Built and used on the GPU machine (scripts/kernel-trace.sh does both):
//   nvcc -O2 -shared -Xcompiler -fPIC -DKREC=CUpti_ActivityKernel9 -I$CUDA/extras/CUPTI/include \
//        -o libktrace.so tools/gpu/kernel_trace.cpp -L$CUDA/extras/CUPTI/lib64 -lcupti
//   CUDA_INJECTION64_PATH=$PWD/libktrace.so KTRACE_OUT=trace.csv dsv4 bench ...
// Columns: start_ns,end_ns,stream,graph_id,correlation,name (start and end are GPU timestamps).
#include <cupti.h>
#include <cstdio>
#include <cstdlib>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif

static FILE* out;
static const size_t kBuf = 16 << 20;

static void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
    *buf = (uint8_t*)aligned_alloc(8, kBuf);
    *size = kBuf;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buf, size_t, size_t valid) {
    CUpti_Activity* rec = nullptr;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
        const KREC* k = (const KREC*)rec;
        fprintf(out, "%llu,%llu,%u,%u,%u,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                k->streamId, k->graphId, k->correlationId, k->name);
    }
    free(buf);
}

static void flush_at_exit() {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}

extern "C" int InitializeInjection() {
    const char* path = getenv("KTRACE_OUT");
    out = fopen(path ? path : "ktrace.csv", "w");
    if (!out) return 0;
    fprintf(out, "start_ns,end_ns,stream,graph_id,correlation,name\n");
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    atexit(flush_at_exit);
    return 1;
}
