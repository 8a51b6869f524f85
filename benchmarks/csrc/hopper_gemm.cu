// A persistent, warp-specialized Hopper GEMM: C (M, N) = A (M, K) @ B (N, K)^T, bf16 in, fp32 accumulation,
// bf16 out (sm_90a: TMA loads, mbarrier pipeline, wgmma). The experiment behind issue 5's next step: a GEMM
// ppalli owns could carry a LoRA block's rank-r terms and its gated activation in the epilogue, which
// cuBLAS cannot, if its main loop keeps up with cuBLAS's (Triton's ran 6-18% behind on the H200,
// results/2026-12-04-h200-lora-glu-mm.txt). Not used by the package: benchmarks/bench_hopper_gemm.py builds
// and times it. H200 (2026-12-04, results/2026-12-04-h200-s23-hopper-gemm-5.txt): products bit-equal to
// cuBLAS's, at 0.91-0.98 of its sustained rate on T4's and T1's shapes (clusters of 2); the gate/up + SwiGLU
// variant lost to cuBLAS + lora_glu_fwd (0.91x / 0.93x, *-swiglu.txt) since its epilogue stops both
// consumers' MMAs. The ping-pong schedule below (s24 files): 0.92-0.98x cuBLAS, and its SwiGLU variant at
// parity with cuBLAS + lora_glu_fwd (0.994x / 1.004x): g and u still go out for the backward, so the fusion
// saves one read of them at most. Where this line stopped and why: 2026-12-04-summary.md, seventh part.
//
// One CTA per SM walks output tiles of BM x BN. Warpgroup 0 (one thread) issues the TMA copies of A's and B's
// (BM | BN) x BK tiles into a STAGES-deep ring of shared memory; warpgroups 1 and 2 each own 64 of the BM rows
// and run wgmma m64n256k16 over the stage, then free it. A stage's `full` barrier counts the bytes TMA lands,
// its `empty` barrier one arrival per consumer warpgroup. Tiles go out in bands of GROUP_M row tiles so the
// CTAs working at one time share A's rows and B's columns in L2. The epilogue stores straight from registers
// (or, built with GEMM_TMA_STORE=1, through shared memory and TMA). Clusters of 2 CTAs share B's tile through
// TMA multicast. Shapes: M % (BM x cluster) == 0, N % BN == 0, K % BK == 0 (the launcher refuses others).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "sm90.cuh"

namespace {

using namespace sm90;

#ifndef GEMM_STAGES  // -D overrides, for sweeps (benchmarks/bench_hopper_gemm.py --lib)
#define GEMM_STAGES 4
#endif
#ifndef GEMM_GROUP_M
#define GEMM_GROUP_M 16
#endif
constexpr int BM = 128, BN = 256, BK = 64, STAGES = GEMM_STAGES, GROUP_M = GEMM_GROUP_M;
constexpr int CONSUMERS = 2;  // warpgroups running wgmma, 64 rows each
constexpr int THREADS = 128 * (CONSUMERS + 1);
constexpr uint32_t STAGE_BYTES = (BM + BN) * BK * 2;

#ifndef GEMM_TMA_STORE  // 1: the plain GEMM's epilogue goes through shared memory and TMA stores (build with
#define GEMM_TMA_STORE 0  // GEMM_STAGES=3: the C tile takes the fourth stage's room)
#endif

struct Smem {  // each tile 1024-byte aligned: the 128-byte swizzle repeats every 8 rows of 128 bytes
  alignas(1024) __nv_bfloat16 a[STAGES][BM * BK];
  alignas(1024) __nv_bfloat16 b[STAGES][BN * BK];
#if GEMM_TMA_STORE
  alignas(1024) __nv_bfloat16 c[BM * BN];  // per consumer 64 rows as 4 boxes of 64 x 64, 128-byte swizzled
#endif
  alignas(8) uint64_t full[STAGES];
  alignas(8) uint64_t empty[STAGES];
};

// MN-major B (a row-major (K, N) matrix), loaded as boxes of 64 K rows x 64 N columns (128 bytes, swizzled),
// box j (columns 64j..) at 8 KB x j: a swizzle atom is 8 K rows x 64 columns (1 KB). The descriptor's leading
// field takes the stride between atoms along N (8 KB), its stride field the one along K (1 KB): the other way
// round gave a relative error of 1.2 on the H200 (2026-12-04-h200-s24-hopper-gemm-nn-swap1.txt), this way 0.
__device__ __forceinline__ uint64_t desc_mn128(uint32_t addr) {
  constexpr uint64_t lead = 8192 >> 4, stride = 1024 >> 4;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (lead << 16) | (stride << 32) | (1ull << 62);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Within each quad of lanes (q = lane % 4): v[i] holds this lane's 2 columns of chunk i; afterwards w[p] holds
// lane p's 2 columns of chunk q, so w is chunk q's 8 columns in order. Round i sends v[(q - i) % 4] and takes
// from lane (q + i) % 4; selects, not a run-time index, keep v and w in registers.
__device__ __forceinline__ void quad_transpose(const uint32_t v[4], uint32_t w[4], int q, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int send_idx = (q - i) & 3, from = (q + i) & 3;
    const uint32_t send = send_idx == 0 ? v[0] : send_idx == 1 ? v[1] : send_idx == 2 ? v[2] : v[3];
    const uint32_t got = __shfl_sync(0xffffffffu, send, (lane & ~3) | from);
#pragma unroll
    for (int p = 0; p < 4; ++p) w[p] = from == p ? got : w[p];
  }
}

// Columns 8 (j0 + q) .. + 7 of this lane's row r (half 0) or r + 8 (half 1) as 16 bytes, from accumulator
// chunks j0 .. j0 + 3 (see quad_transpose); half and j0 must be compile-time (unrolled loops): acc's index.
__device__ __forceinline__ uint4 row_chunk(const float* acc, int half, int j0, int q, int lane) {
  uint32_t v[4], w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = pack_bf16(acc[4 * (j0 + i) + 2 * half], acc[4 * (j0 + i) + 2 * half + 1]);
  quad_transpose(v, w, q, lane);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// A tile's rows r and r + 8 (this lane's), 16 bytes a store from col on.
__device__ __forceinline__ void store_tile(const float* acc, __nv_bfloat16* c, int r, int col, int ldc, int q,
                                           int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    __nv_bfloat16* out = c + static_cast<int64_t>(r + 8 * half) * ldc + col;
#pragma unroll
    for (int j0 = 0; j0 < BN / 8; j0 += 4)
      *reinterpret_cast<uint4*>(out + 8 * j0) = row_chunk(acc, half, j0, q, lane);
  }
}

#if GEMM_TMA_STORE
// store_tile into shared memory: this warpgroup's 64 rows as 4 boxes of 64 x 64 (8 KB each), 16-byte chunk
// J of a row at chunk J % 8 XOR row % 8 of its box (TMA's 128-byte swizzle), which also keeps the 8 rows of
// one warp store on different banks.
__device__ __forceinline__ void stage_tile(const float* acc, __nv_bfloat16* cs, int row, int q, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row + 8 * half;
#pragma unroll
    for (int j0 = 0; j0 < BN / 8; j0 += 4) {
      const int chunk = j0 + q;  // 8 columns
      __nv_bfloat16* dst = cs + (chunk / 8) * 64 * 64 + r * 64 + (((chunk % 8) ^ (r % 8)) * 8);
      *reinterpret_cast<uint4*>(dst) = row_chunk(acc, half, j0, q, lane);
    }
  }
}
#endif

__device__ __forceinline__ uint32_t silu_mul(uint32_t g2, uint32_t u2) {
  const float2 g = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&g2));
  const float2 u = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u2));
  return pack_bf16(g.x / (1.0f + __expf(-g.x)) * u.x, g.y / (1.0f + __expf(-g.y)) * u.y);
}

// The GLU tile's epilogue: accumulator chunks 0-15 are g's 128 columns, 16-31 u's same columns; rows r and
// r + 8, 16 bytes a store from col on (row_chunk), h from g and u as rounded.
__device__ __forceinline__ void glu_epilogue(const float* acc, __nv_bfloat16* g_out, __nv_bfloat16* u_out,
                                             __nv_bfloat16* h_out, int r, int col, int ldc, int q, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = static_cast<int64_t>(r + 8 * half) * ldc + col;
#pragma unroll
    for (int j0 = 0; j0 < 16; j0 += 4) {
      const uint4 g = row_chunk(acc, half, j0, q, lane), u = row_chunk(acc + 64, half, j0, q, lane);
      *reinterpret_cast<uint4*>(g_out + row + 8 * j0) = g;
      *reinterpret_cast<uint4*>(u_out + row + 8 * j0) = u;
      *reinterpret_cast<uint4*>(h_out + row + 8 * j0) =
          make_uint4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z), silu_mul(g.w, u.w));
    }
  }
}

// The epilogue through shared memory: wait until the last tile's TMA stores have read this warpgroup's half
// of the C buffer, write the accumulators into it, make them visible to the async proxy, and let one thread
// store the 4 boxes; the warpgroup goes on to its next tile while TMA writes this one out.
__device__ __forceinline__ void tma_epilogue(const float* acc, Smem& s, const CUtensorMap& map_c, int wg, int tid,
                                             int row, int q, int lane, int row0, int col0) {
#if GEMM_TMA_STORE
  __nv_bfloat16* cs = s.c + (wg - 1) * 64 * BN;
  if (tid == 0) bulk_wait_read();
  named_sync(wg, 128);
  stage_tile(acc, cs, row, q, lane);
  fence_proxy_async();
  named_sync(wg, 128);
  if (tid == 0) {
#pragma unroll
    for (int box = 0; box < BN / 64; ++box) tma_store_2d(&map_c, cs + box * 64 * 64, col0 + box * 64, row0);
    bulk_commit();
  }
#endif
}

// A stage's buffers handed back: to this CTA's producer, or with a cluster to every CTA's (their multicasts
// write into this CTA's copy of the stage).
template <int CLUSTER, bool MULTICAST>
__device__ __forceinline__ void release(uint64_t* bar) {
  if constexpr (CLUSTER > 1 && MULTICAST) {
#pragma unroll
    for (int cta = 0; cta < CLUSTER; ++cta) mbar_arrive_cluster(bar, cta);
  } else {
    mbar_arrive(bar);
  }
}

__device__ __forceinline__ void tile_coords(int t, int tiles_m, int tiles_n, int& m, int& n) {
  int band = GROUP_M * tiles_n;
  int first = (t / band) * GROUP_M;
  int rows = min(tiles_m - first, GROUP_M);
  m = first + (t % band) % rows;
  n = (t % band) / rows;
}

// Group t's tile for this CTA: the cluster's groups walk tile_coords over row tiles CLUSTER at a time.
template <int CLUSTER>
__device__ __forceinline__ void cluster_tile(int t, int tiles_m, int tiles_n, uint32_t rank, int& m, int& n) {
  tile_coords(t, tiles_m / CLUSTER, tiles_n, m, n);
  m = m * CLUSTER + static_cast<int>(rank);
}

// CLUSTER CTAs (1 or 2) take CLUSTER consecutive row tiles of one column block: each loads its A tile and
// 1/CLUSTER of the shared B tile, multicast to all, so L2 serves B once per cluster rather than per CTA. A
// stage is free again only when the consumers of every CTA in the cluster are done with it.
// MULTICAST false (measurement only): clusters formed, each CTA loading its whole B tile itself.
// GLU: B's tile is 128 rows of W_gate over 128 rows of W_up (map_b, map_b2: the cluster's two CTAs load one
// each), so each tile's accumulators hold g and u for the same 128 columns; the epilogue writes g, u and
// h = silu(g) * u (from g and u as rounded to bf16, as lora_glu_fwd reads them) to c, c2, c3, all (M, n_size).
// B_MN: B is a row-major (K, N) matrix (C = A @ B, an input gradient's layout), loaded as 64 x 64 boxes.
template <int CLUSTER, bool MULTICAST, bool GLU, bool B_MN>
__global__ void __launch_bounds__(THREADS, 1)
    gemm_tn_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                   const __grid_constant__ CUtensorMap map_b2, const __grid_constant__ CUtensorMap map_c,
                   __nv_bfloat16* __restrict__ c,
                   __nv_bfloat16* __restrict__ c2, __nv_bfloat16* __restrict__ c3, int m_size, int n_size,
                   int k_size, int ldc) {
  extern __shared__ uint8_t raw[];
  Smem& s = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], CONSUMERS * (MULTICAST ? CLUSTER : 1));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (CLUSTER > 1)
    cluster_sync();  // no CTA multicasts into a partner's barriers before they exist
  else
    __syncthreads();
  constexpr int TILE_N = GLU ? BN / 2 : BN;  // output columns a tile covers
  const int tiles_m = m_size / BM, tiles_n = n_size / TILE_N, k_iters = k_size / BK;
  const int groups = tiles_m / CLUSTER * tiles_n, first = blockIdx.x / CLUSTER, step = gridDim.x / CLUSTER;
  constexpr int B_ROWS = MULTICAST ? BN / CLUSTER : BN;  // B rows this CTA loads per stage

  if (wg == 0) {  // producer: one thread issues every copy
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int t = first; t < groups; t += step) {
        int m, n;
        cluster_tile<CLUSTER>(t, tiles_m, tiles_n, rank, m, n);
        for (int k = 0; k < k_iters; ++k) {
          mbar_wait(&s.empty[stage], phase ^ 1);  // the first pass finds every stage free
          mbar_expect_tx(&s.full[stage], STAGE_BYTES);
          tma_load_2d(s.a[stage], &map_a, &s.full[stage], k * BK, m * BM);
          if constexpr (GLU && CLUSTER > 1 && MULTICAST) {  // rank 0 brings W_gate's rows, rank 1 W_up's
            tma_load_2d_multicast(s.b[stage] + rank * (BN / 2) * BK, rank ? &map_b2 : &map_b, &s.full[stage],
                                  k * BK, n * TILE_N, (1 << CLUSTER) - 1);
          } else if constexpr (GLU) {
            tma_load_2d(s.b[stage], &map_b, &s.full[stage], k * BK, n * TILE_N);
            tma_load_2d(s.b[stage] + (BN / 2) * BK, &map_b2, &s.full[stage], k * BK, n * TILE_N);
          } else if constexpr (B_MN) {  // BN / 64 boxes of 64 K rows x 64 columns; in a cluster, a share each
            constexpr int boxes = BN / 64 / (MULTICAST ? CLUSTER : 1);
#pragma unroll
            for (int j = (MULTICAST ? rank : 0) * boxes; j < ((MULTICAST ? rank : 0) + 1) * boxes; ++j) {
              if constexpr (CLUSTER > 1 && MULTICAST)
                tma_load_2d_multicast(s.b[stage] + j * 64 * BK, &map_b, &s.full[stage], n * BN + 64 * j, k * BK,
                                      (1 << CLUSTER) - 1);
              else
                tma_load_2d(s.b[stage] + j * 64 * BK, &map_b, &s.full[stage], n * BN + 64 * j, k * BK);
            }
          } else if constexpr (CLUSTER > 1 && MULTICAST) {
            tma_load_2d_multicast(s.b[stage] + rank * B_ROWS * BK, &map_b, &s.full[stage], k * BK,
                                  n * BN + rank * B_ROWS, (1 << CLUSTER) - 1);
          } else {
            tma_load_2d(s.b[stage], &map_b, &s.full[stage], k * BK, n * BN);
          }
          if (++stage == STAGES) stage = 0, phase ^= 1;
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int row0 = (wg - 1) * 64;  // this warpgroup's rows of the tile
    float acc[128];
    int stage = 0, prev = 0;
    uint32_t phase = 0;
    for (int t = first; t < groups; t += step) {
      int m, n;
      cluster_tile<CLUSTER>(t, tiles_m, tiles_n, rank, m, n);
      for (int k = 0; k < k_iters; ++k) {
        mbar_wait(&s.full[stage], phase);
        const uint32_t a = smem_addr(s.a[stage]) + row0 * BK * 2, b = smem_addr(s.b[stage]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {  // 16 of K: 32 bytes along A's swizzled rows; B as below
          if constexpr (B_MN)  // 16 K rows of 128 bytes = 2 swizzle atoms down each 64-column box
            wgmma_m64n256k16<1>(acc, desc_k128(a + kk * 32), desc_mn128(b + kk * 2048), (k > 0 || kk > 0) ? 1 : 0);
          else
            wgmma_m64n256k16<0>(acc, desc_k128(a + kk * 32), desc_k128(b + kk * 32), (k > 0 || kk > 0) ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous stage's products are done: hand its buffers back
        if (k > 0 && tid == 0) release<CLUSTER, MULTICAST>(&s.empty[prev]);
        prev = stage;
        if (++stage == STAGES) stage = 0, phase ^= 1;
      }
      wgmma_wait<0>();
      if (tid == 0) release<CLUSTER, MULTICAST>(&s.empty[prev]);
      // Accumulator layout of m64nNk16 (fp32): warp w holds rows 16w + lane/4 and 8 more; per 8 columns j,
      // acc[4j..4j+3] = (r, c), (r, c+1), (r+8, c), (r+8, c+1) with c = 8j + 2 (lane % 4). The 4 lanes of a
      // quad swap pairs so each stores 8 whole columns (16 bytes) of one of 4 chunks: a warp's store covers
      // 8 rows x 64 bytes, not 8 x 16 (the first version stored the 4-byte pairs: 0.87-0.95x cuBLAS).
      const int warp = tid / 32, lane = tid % 32, q = lane % 4;
      const int r = m * BM + row0 + warp * 16 + lane / 4;
      if constexpr (GLU)
        glu_epilogue(acc, c, c2, c3, r, n * TILE_N + 8 * q, ldc, q, lane);
      else if constexpr (GEMM_TMA_STORE)
        tma_epilogue(acc, s, map_c, wg, tid, warp * 16 + lane / 4, q, lane, m * BM + row0, n * BN);
      else
        store_tile(acc, c, r, n * BN + 8 * q, ldc, q, lane);
    }
#if GEMM_TMA_STORE
    if (!GLU && tid == 0) bulk_wait();  // this warpgroup's last stores are out of shared memory before it goes
#endif
  }
  if constexpr (CLUSTER > 1) cluster_sync();  // no CTA leaves while a partner may still write into it
}

// H200, 2026-12-04 (results/2026-12-04-h200-s24-hopper-gemm-pingpong.txt, sustained, products bit-equal to
// cuBLAS's): 1B gate/up 0.984x cuBLAS, q/o 0.959x, 8B gate/up 0.969x, but 1B down 0.923x and 8B down 0.934x
// (clusters of 2 of gemm_tn_kernel there: 0.957x, 0.972x).
// Ping-pong (GEMM_PINGPONG_STAGES stages of 64 x 64 of A and 256 x 64 of B): each consumer warpgroup owns
// whole 64 x 256 tiles, the CTA's tiles dealt to the two in turn, and `turn` barriers let only one of them
// issue MMAs at a time: while one runs its main loop the other writes its last tile out, so the epilogue no
// longer stops the tensor cores (in gemm_tn_kernel both consumers store at once: 0.91-0.98x cuBLAS). The
// stages are used in tile order, tile i taking ring positions i * k_iters onwards; one consumer frees each.
#ifndef GEMM_PINGPONG_STAGES
#define GEMM_PINGPONG_STAGES 5
#endif
constexpr int PP_BM = 64, PP_STAGES = GEMM_PINGPONG_STAGES;
constexpr uint32_t PP_STAGE_BYTES = (PP_BM + BN) * BK * 2;

struct SmemPingPong {
  alignas(1024) __nv_bfloat16 a[PP_STAGES][PP_BM * BK];
  alignas(1024) __nv_bfloat16 b[PP_STAGES][BN * BK];
  alignas(8) uint64_t full[PP_STAGES];
  alignas(8) uint64_t empty[PP_STAGES];
  alignas(8) uint64_t turn[CONSUMERS];  // completes when consumer i may issue its next tile's MMAs
};

// GLU: as gemm_tn_kernel's, B's tile 128 rows of W_gate (map_b) over 128 of W_up (map_b2), outputs g, u, h.
template <bool GLU>
__global__ void __launch_bounds__(THREADS, 1)
    gemm_pingpong_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_b2, __nv_bfloat16* __restrict__ c,
                         __nv_bfloat16* __restrict__ c2, __nv_bfloat16* __restrict__ c3, int m_size, int n_size,
                         int k_size, int ldc) {
  extern __shared__ uint8_t raw[];
  SmemPingPong& s =
      *reinterpret_cast<SmemPingPong*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~static_cast<uintptr_t>(1023));
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int i = 0; i < PP_STAGES; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], 1);
    }
    for (int i = 0; i < CONSUMERS; ++i) mbar_init(&s.turn[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  constexpr int TILE_N = GLU ? BN / 2 : BN;
  const int tiles_m = m_size / PP_BM, tiles_n = n_size / TILE_N, tiles = tiles_m * tiles_n, k_iters = k_size / BK;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 0) {
      mbar_arrive(&s.turn[0]);  // consumer 0 goes first
      int stage = 0;
      uint32_t phase = 0;
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        int m, n;
        tile_coords(t, tiles_m, tiles_n, m, n);
        for (int k = 0; k < k_iters; ++k) {
          mbar_wait(&s.empty[stage], phase ^ 1);
          mbar_expect_tx(&s.full[stage], PP_STAGE_BYTES);
          tma_load_2d(s.a[stage], &map_a, &s.full[stage], k * BK, m * PP_BM);
          tma_load_2d(s.b[stage], &map_b, &s.full[stage], k * BK, n * TILE_N);
          if constexpr (GLU) tma_load_2d(s.b[stage] + (BN / 2) * BK, &map_b2, &s.full[stage], k * BK, n * TILE_N);
          if (++stage == PP_STAGES) stage = 0, phase ^= 1;
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int me = wg - 1;
  float acc[128];
  uint32_t turn_phase = 0;
  int64_t i = me;  // the CTA's tile count so far: this consumer takes every second one
  for (int t = blockIdx.x + me * gridDim.x; t < tiles; t += CONSUMERS * gridDim.x, i += CONSUMERS) {
    int m, n;
    tile_coords(t, tiles_m, tiles_n, m, n);
    const int64_t pos = i * k_iters;
    int stage = static_cast<int>(pos % PP_STAGES), prev = stage;
    uint32_t phase = static_cast<uint32_t>((pos / PP_STAGES) & 1);
    mbar_wait(&s.turn[me], turn_phase);
    turn_phase ^= 1;
    for (int k = 0; k < k_iters; ++k) {
      mbar_wait(&s.full[stage], phase);
      const uint32_t a = smem_addr(s.a[stage]), b = smem_addr(s.b[stage]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
        wgmma_m64n256k16<0>(acc, desc_k128(a + kk * 32), desc_k128(b + kk * 32), (k > 0 || kk > 0) ? 1 : 0);
      wgmma_commit();
      wgmma_wait<1>();
      if (k > 0 && tid == 0) mbar_arrive(&s.empty[prev]);
      prev = stage;
      if (++stage == PP_STAGES) stage = 0, phase ^= 1;
    }
    if (tid == 0) mbar_arrive(&s.turn[me ^ 1]);  // every MMA of this tile is issued: the other may start
    wgmma_wait<0>();
    if (tid == 0) mbar_arrive(&s.empty[prev]);
    const int warp = tid / 32, lane = tid % 32, q = lane % 4;
    const int r = m * PP_BM + warp * 16 + lane / 4;
    if constexpr (GLU)
      glu_epilogue(acc, c, c2, c3, r, n * TILE_N + 8 * q, ldc, q, lane);
    else
      store_tile(acc, c, r, n * BN + 8 * q, ldc, q, lane);
  }
}

typedef CUresult (*EncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {  // the driver's function, found at run time: no link against libcuda
  static EncodeTiled fn = nullptr;
  if (fn == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiled>(p);
  }
  return fn;
}

// A row-major (rows, cols) bf16 matrix with row stride ld, read in boxes of box_rows x BK (128-byte rows).
int tensor_map(CUtensorMap* map, const void* ptr, int rows, int cols, int ld, int box_rows) {
  EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return -1;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  cuuint32_t box[2] = {BK, static_cast<cuuint32_t>(box_rows)};
  cuuint32_t steps[2] = {1, 1};
  CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box, steps,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : -2;
}


template <int CLUSTER, bool MULTICAST, bool GLU, bool B_MN = false>
int resident = 0;  // CTAs of gemm_tn_kernel<...> that fit at once, clusters counted whole (after a launch)

// b2, c2, c3: the GLU's W_up and its u and h outputs (else unused); n: output columns.
template <int CLUSTER, bool MULTICAST, bool GLU, bool B_MN = false>
int launch(const void* a, const void* b, const void* b2, void* c, void* c2, void* c3, int m, int n, int k, int lda,
           int ldb, int ldc, int ctas, cudaStream_t stream) {
  constexpr int tile_n = GLU ? BN / 2 : BN;
  if ((m / BM) % CLUSTER || m % BM || n % tile_n || k % BK) return -3;
  CUtensorMap map_a, map_b, map_b2, map_c;
  int err = tensor_map(&map_a, a, m, k, lda, BM);
  if (err == 0) err = tensor_map(&map_c, c, m, n, ldc, 64);  // 64 x 64 boxes (used with GEMM_TMA_STORE)
  if (err == 0 && B_MN) err = tensor_map(&map_b, b, k, n, ldb, 64);  // (K, N), 64 x 64 boxes
  if (err == 0 && !B_MN) err = tensor_map(&map_b, b, n, k, ldb, GLU ? BN / 2 : MULTICAST ? BN / CLUSTER : BN);
  if (err == 0) err = tensor_map(&map_b2, GLU ? b2 : b, n, k, ldb, GLU ? BN / 2 : BN);
  if (err) return err;
  auto kernel = gemm_tn_kernel<CLUSTER, MULTICAST, GLU, B_MN>;
  const int smem = sizeof(Smem) + 1024;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CLUSTER;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int& fit = resident<CLUSTER, MULTICAST, GLU, B_MN>;
  if (fit == 0) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    cfg.gridDim = dim3(ctas);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters == 0)
      return static_cast<int>(cudaGetLastError());
    fit = clusters * CLUSTER;
  }
  const int groups = (m / BM / CLUSTER) * (n / tile_n);
  const int grid = (fit < ctas ? fit : ctas) / CLUSTER;
  cfg.gridDim = dim3((groups < grid ? groups : grid) * CLUSTER);
  auto out = [](void* p) { return static_cast<__nv_bfloat16*>(p); };
  cudaError_t e =
      cudaLaunchKernelEx(&cfg, kernel, map_a, map_b, map_b2, map_c, out(c), out(c2), out(c3), m, n, k, ldc);
  return static_cast<int>(e != cudaSuccess ? e : cudaGetLastError());
}

template <bool GLU>
int launch_pingpong(const void* a, const void* b, const void* b2, void* c, void* c2, void* c3, int m, int n, int k,
                    int lda, int ldb, int ldc, int ctas, cudaStream_t stream) {
  constexpr int tile_n = GLU ? BN / 2 : BN;
  if (m % PP_BM || n % tile_n || k % BK) return -3;
  CUtensorMap map_a, map_b, map_b2;
  int err = tensor_map(&map_a, a, m, k, lda, PP_BM);
  if (err == 0) err = tensor_map(&map_b, b, n, k, ldb, tile_n);
  if (err == 0) err = tensor_map(&map_b2, GLU ? b2 : b, n, k, ldb, tile_n);
  if (err) return err;
  auto kernel = gemm_pingpong_kernel<GLU>;
  const int smem = sizeof(SmemPingPong) + 1024;
  static bool sized = false;
  if (!sized) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    sized = true;
  }
  const int tiles = (m / PP_BM) * (n / tile_n);
  auto out = [](void* p) { return static_cast<__nv_bfloat16*>(p); };
  kernel<<<tiles < ctas ? tiles : ctas, THREADS, smem, stream>>>(map_a, map_b, map_b2, out(c), out(c2), out(c3), m,
                                                                   n, k, ldc);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// C = A @ B^T with clusters of `cluster` CTAs (1 or 2; -2: clusters of 2 without multicast), at most `ctas`
// CTAs. Returns 0, or -1 (no cuTensorMapEncodeTiled), -2 (a tensor map refused), -3 (a shape the kernel does
// not tile, or a cluster size it does not take), or a cudaError_t.
extern "C" int ppalli_gemm_tn(const void* a, const void* b, void* c, int m, int n, int k, int lda, int ldb,
                              int ldc, int ctas, int cluster, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cluster == 2) return launch<2, true, false>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, st);
  if (cluster == -2) return launch<2, false, false>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, st);
  if (cluster == 1) return launch<1, false, false>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, st);
  return -3;
}

// C = A @ B with B a row-major (K, N) matrix (row stride ldb): an input gradient dy W. The same returns.
extern "C" int ppalli_gemm_nn(const void* a, const void* b, void* c, int m, int n, int k, int lda, int ldb,
                              int ldc, int ctas, int cluster, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cluster == 2) return launch<2, true, false, true>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, st);
  if (cluster == 1) return launch<1, false, false, true>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, st);
  return -3;
}

// The gated MLP's front half: g = x Wg^T, u = x Wu^T and h = silu(g) * u, x (m, k), Wg and Wu (n, k), each
// output (m, n) with row stride ldc; the same returns as ppalli_gemm_tn.
extern "C" int ppalli_gemm_swiglu(const void* x, const void* wg, const void* wu, void* g, void* u, void* h, int m,
                                  int n, int k, int ldx, int ldw, int ldc, int ctas, int cluster, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cluster == 2) return launch<2, true, true>(x, wg, wu, g, u, h, m, n, k, ldx, ldw, ldc, ctas, st);
  if (cluster == 1) return launch<1, false, true>(x, wg, wu, g, u, h, m, n, k, ldx, ldw, ldc, ctas, st);
  return -3;
}

// C = A @ B^T through gemm_pingpong_kernel (no clusters); the same returns as ppalli_gemm_tn.
extern "C" int ppalli_gemm_pingpong(const void* a, const void* b, void* c, int m, int n, int k, int lda, int ldb,
                                    int ldc, int ctas, void* stream) {
  return launch_pingpong<false>(a, b, b, c, c, c, m, n, k, lda, ldb, ldc, ctas, static_cast<cudaStream_t>(stream));
}

// ppalli_gemm_swiglu's outputs through the ping-pong kernel.
extern "C" int ppalli_gemm_swiglu_pingpong(const void* x, const void* wg, const void* wu, void* g, void* u, void* h,
                                           int m, int n, int k, int ldx, int ldw, int ldc, int ctas, void* stream) {
  return launch_pingpong<true>(x, wg, wu, g, u, h, m, n, k, ldx, ldw, ldc, ctas, static_cast<cudaStream_t>(stream));
}

// CTAs that fit at once in clusters of `cluster` (0 before the first launch of that size; plain GEMM).
extern "C" int ppalli_gemm_resident(int cluster) {
  return cluster == 2 ? resident<2, true, false> : cluster == -2 ? resident<2, false, false> : resident<1, false, false>;
}
