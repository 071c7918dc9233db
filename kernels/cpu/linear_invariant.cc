// The batch-invariant CPU Linear (see SetBatchInvariant in gemm.h).
//
// Every output y[i, j] = x[i] · w[j] (+ bias[j]) is the same sequence of f32 operations, whatever
// else is in the call:
//
//   acc[l] = fma(x[i][8t + l], w[j][8t + l], acc[l])   for t = 0, 1, ... in order, l = 0..7
//   s = HSum(acc)                                       (a fixed tree over the 8 lanes)
//   s = fma(x[i][c], w[j][c], s)                        for the tail c = k8 .. k-1, in order
//   y[i, j] = s + bias[j]
//
// which is the accumulation the decode GEMV always did. Everything else is scheduling: a register
// tile holds the accumulators of a few x rows times a few w rows at once, cache blocks cut m, n
// and k, a K block of x and w may first be copied (w widened) into tile-ordered panels, and
// between two K blocks a tile's 8-lane accumulators are stored to and reloaded from memory; all
// of that is exact. None of that changes the order of the additions into one accumulator, and
// threads divide the (m, n) blocks, never K. So a token's row is bitwise the same with 1 or 4096
// rows in the call, whatever the thread count — what the serving invariant needs
// (ARCHITECTURE.md: greedy output identical offline and batched).
//
// It is a dot-product GEMM (8 partial sums per output where sgemm keeps one): with many rows it
// reaches ~0.7x OpenBLAS sgemm's throughput, with few rows it matches or beats the GEMV / sgemm
// paths it replaces (figures with SetBatchInvariant in gemm.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "linear_params.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels::cpu {
namespace {

constexpr int64_t kLanes = 8;
// Cache blocks: kMb x rows by up to 96 w rows, K cut into kKc-wide blocks (a multiple of kLanes)
// when packing. One K block of x (64 KiB packed), of w (96 KiB as f32) and the block's 8-lane
// accumulators (192 KiB) stay in L2 while the register tiles sweep them, and each x block read is
// shared by 96 w rows. Chosen by measurement at T = 512, K = N = 2048 on Zen 2 (512 KiB L2):
// 48-row w blocks were ~15% slower with f32 weights, K blocks of 128 ~12% slower.
constexpr int64_t kKc = 256;
constexpr int64_t kMb = 64;
// w rows per block, largest first (96, 48 and 24 split evenly into every tile width below);
// smaller blocks are used only to give every worker something to do.
constexpr int64_t kNbChoices[] = {96, 48, 24, 16, 8};
// From this many x rows in a block, each K block of x and w is first packed (w widened to f32)
// into tile-ordered panels that the register tiles then read as contiguous streams; fewer rows
// read x and w in place (16-bit weights widened in registers). Packing is exact, so the choice
// changes no result.
constexpr int64_t kPackMinRows = 32;
// Multiply-adds per worker below which a pool hand-off costs more than it saves.
constexpr int64_t kMinMacsPerChunk = 65536;

// Register tiles: up to 4 x rows by TileCols(rows) w rows. mt * R accumulators, mt x vectors and
// one w vector fit the 16 ymm registers. Packed panels use kMaxTileRows x kPackCols tiles.
constexpr int kMaxTileRows = 4;
constexpr int TileCols(int mt) { return mt >= 4 ? 3 : mt == 3 ? 4 : mt == 2 ? 6 : 8; }
constexpr int kPackCols = TileCols(kMaxTileRows);

inline float MulAdd(float a, float b, float c) {
#if CLEAVE_CPU_AVX2
  return __builtin_fmaf(a, b, c);  // one vfmadd, as in the vector loop
#else
  return a * b + c;
#endif
}

// The 8 lanes of acc summed in HSum's order.
inline float SumLanes(const float* acc) {
#if CLEAVE_CPU_AVX2
  return HSum(_mm256_loadu_ps(acc));
#else
  const float s0 = acc[0] + acc[4], s1 = acc[1] + acc[5], s2 = acc[2] + acc[6],
              s3 = acc[3] + acc[7];
  return (s0 + s2) + (s1 + s3);
#endif
}

// acc tile (a, r) += x[a][0, kc) · w[r][0, kc) per lane. acc(a, r) is at acc + a * acc_row + r * 8.
template <DType W, int MT, int R>
void Tile(const float* const* x, const WElem<W>* const* w, int64_t kc, float* acc,
          int64_t acc_row) {
#if CLEAVE_CPU_AVX2
  __m256 c[MT][R];
  for (int a = 0; a < MT; ++a) {
    for (int r = 0; r < R; ++r) c[a][r] = _mm256_loadu_ps(acc + a * acc_row + r * kLanes);
  }
  for (int64_t i = 0; i < kc; i += kLanes) {
    __m256 xv[MT];
    for (int a = 0; a < MT; ++a) xv[a] = _mm256_loadu_ps(x[a] + i);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = LoadW8<W>(w[r] + i);
      for (int a = 0; a < MT; ++a) c[a][r] = _mm256_fmadd_ps(xv[a], wv, c[a][r]);
    }
  }
  for (int a = 0; a < MT; ++a) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + a * acc_row + r * kLanes, c[a][r]);
  }
#else
  for (int a = 0; a < MT; ++a) {
    for (int r = 0; r < R; ++r) {
      float* c = acc + a * acc_row + r * kLanes;
      for (int64_t i = 0; i < kc; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) c[l] += x[a][i + l] * WidenOne<W>(w[r][i + l]);
      }
    }
  }
#endif
}

// MT x rows against w rows [0, nb), w row r at w0 + r * w_stride.
template <DType W, int MT>
void TileRow(const float* const* x, const WElem<W>* w0, int64_t w_stride, int64_t nb, int64_t kc,
             float* acc, int64_t acc_row) {
  constexpr int R = TileCols(MT);
  const WElem<W>* ws[R];
  int64_t r0 = 0;
  for (; r0 + R <= nb; r0 += R) {
    for (int r = 0; r < R; ++r) ws[r] = w0 + (r0 + r) * w_stride;
    Tile<W, MT, R>(x, ws, kc, acc + r0 * kLanes, acc_row);
  }
  for (; r0 < nb; ++r0) {
    ws[0] = w0 + r0 * w_stride;
    Tile<W, MT, 1>(x, ws, kc, acc + r0 * kLanes, acc_row);
  }
}

// One K block of a cache block: x rows [0, mb) (columns [k0, k0 + kc)) against nb w rows.
template <DType W>
void SweepBlock(const float* x0, int64_t ldx, int64_t mb, int64_t k0, const WElem<W>* w0,
                int64_t w_stride, int64_t nb, int64_t kc, float* acc) {
  const int64_t acc_row = nb * kLanes;
  const float* xs[kMaxTileRows];
  for (int64_t a0 = 0; a0 < mb; a0 += kMaxTileRows) {
    const int64_t mt = std::min<int64_t>(kMaxTileRows, mb - a0);
    for (int64_t a = 0; a < mt; ++a) xs[a] = x0 + (a0 + a) * ldx + k0;
    float* acc_a = acc + a0 * acc_row;
    switch (mt) {
      case 4:
        TileRow<W, 4>(xs, w0, w_stride, nb, kc, acc_a, acc_row);
        break;
      case 3:
        TileRow<W, 3>(xs, w0, w_stride, nb, kc, acc_a, acc_row);
        break;
      case 2:
        TileRow<W, 2>(xs, w0, w_stride, nb, kc, acc_a, acc_row);
        break;
      default:
        TileRow<W, 1>(xs, w0, w_stride, nb, kc, acc_a, acc_row);
        break;
    }
  }
}

// The packed form of Tile: x and w as panels [kc / 8][rows][8] (one tile's rows interleaved by
// 8-lane group), so each step reads MT + R consecutive vectors. Same additions, same order.
template <int MT, int R>
void PackedTile(const float* xp, const float* wp, int64_t kc, float* acc, int64_t acc_row) {
#if CLEAVE_CPU_AVX2
  __m256 c[MT][R];
  for (int a = 0; a < MT; ++a) {
    for (int r = 0; r < R; ++r) c[a][r] = _mm256_loadu_ps(acc + a * acc_row + r * kLanes);
  }
  for (int64_t i = 0; i < kc; i += kLanes, xp += MT * kLanes, wp += R * kLanes) {
    __m256 xv[MT];
    for (int a = 0; a < MT; ++a) xv[a] = _mm256_loadu_ps(xp + a * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(wp + r * kLanes);
      for (int a = 0; a < MT; ++a) c[a][r] = _mm256_fmadd_ps(xv[a], wv, c[a][r]);
    }
  }
  for (int a = 0; a < MT; ++a) {
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + a * acc_row + r * kLanes, c[a][r]);
  }
#else
  for (int64_t i = 0; i < kc; i += kLanes, xp += MT * kLanes, wp += R * kLanes) {
    for (int a = 0; a < MT; ++a) {
      for (int r = 0; r < R; ++r) {
        float* c = acc + a * acc_row + r * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) c[l] += xp[a * kLanes + l] * wp[r * kLanes + l];
      }
    }
  }
#endif
}

template <int MT>
void PackedTileRow(const float* xp, const float* wpanel, int64_t nb, int64_t kc, float* acc,
                   int64_t acc_row) {
  int64_t r0 = 0;
  for (; r0 + kPackCols <= nb; r0 += kPackCols) {
    PackedTile<MT, kPackCols>(xp, wpanel + r0 * kc, kc, acc + r0 * kLanes, acc_row);
  }
  switch (nb - r0) {
    case 2:
      PackedTile<MT, 2>(xp, wpanel + r0 * kc, kc, acc + r0 * kLanes, acc_row);
      break;
    case 1:
      PackedTile<MT, 1>(xp, wpanel + r0 * kc, kc, acc + r0 * kLanes, acc_row);
      break;
    default:
      break;
  }
}

// 8 elements of a w row (or x row, W = f32) to f32.
template <DType W>
inline void Widen8(const WElem<W>* src, float* dst) {
#if CLEAVE_CPU_AVX2
  _mm256_storeu_ps(dst, LoadW8<W>(src));
#else
  for (int64_t l = 0; l < kLanes; ++l) dst[l] = WidenOne<W>(src[l]);
#endif
}

// Rows [0, rows) (row r at src + r * stride, columns [0, kc)) into tiles of `tile` rows, each
// tile laid out [kc / 8][tile rows][8]; tile j starts at out + j * tile * kc.
template <DType W>
void PackPanel(const WElem<W>* src, int64_t stride, int64_t rows, int64_t kc, int64_t tile,
               float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t rt = std::min(tile, rows - r0);
    float* dst = out + r0 * kc;
    for (int64_t r = 0; r < rt; ++r) {
      const WElem<W>* row = src + (r0 + r) * stride;
      for (int64_t i = 0; i < kc; i += kLanes) Widen8<W>(row + i, dst + (i * rt + r * kLanes));
    }
  }
}

// One K block of a cache block from packed panels.
void SweepPacked(const float* xpanel, int64_t mb, const float* wpanel, int64_t nb, int64_t kc,
                 float* acc) {
  const int64_t acc_row = nb * kLanes;
  for (int64_t a0 = 0; a0 < mb; a0 += kMaxTileRows) {
    const float* xp = xpanel + a0 * kc;
    float* acc_a = acc + a0 * acc_row;
    switch (std::min<int64_t>(kMaxTileRows, mb - a0)) {
      case 4:
        PackedTileRow<4>(xp, wpanel, nb, kc, acc_a, acc_row);
        break;
      case 3:
        PackedTileRow<3>(xp, wpanel, nb, kc, acc_a, acc_row);
        break;
      case 2:
        PackedTileRow<2>(xp, wpanel, nb, kc, acc_a, acc_row);
        break;
      default:
        PackedTileRow<1>(xp, wpanel, nb, kc, acc_a, acc_row);
        break;
    }
  }
}

struct Scratch {
  std::vector<float> acc;     // [mb, nb, 8]
  std::vector<float> xpanel;  // [mb * kKc] packed x
  std::vector<float> wpanel;  // [nb * kKc] packed (widened) w
};

// y rows [m0, m0 + mb), columns [n0, n0 + nb).
template <DType W>
void RunBlock(const LinearParams& p, int64_t m0, int64_t mb, int64_t n0, int64_t nb, Scratch& s) {
  const int64_t k8 = p.k / kLanes * kLanes;
  const size_t acc_size = static_cast<size_t>(mb * nb * kLanes);
  if (s.acc.size() < acc_size) s.acc.resize(acc_size);
  float* acc = s.acc.data();
  std::fill(acc, acc + acc_size, 0.0f);
  const WElem<W>* w = static_cast<const WElem<W>*>(p.w) + n0 * p.k;
  const float* x = p.x + m0 * p.ldx;
  const bool pack = mb >= kPackMinRows;
  if (pack && s.xpanel.size() < static_cast<size_t>(mb * kKc)) s.xpanel.resize(mb * kKc);
  if (pack && s.wpanel.size() < static_cast<size_t>(nb * kKc)) s.wpanel.resize(nb * kKc);
  // In place, a few x rows stay in L1 whatever K is, and each w row is best streamed whole.
  const int64_t k_block = pack ? kKc : std::max<int64_t>(k8, kLanes);
  for (int64_t k0 = 0; k0 < k8; k0 += k_block) {
    const int64_t kc = std::min(k_block, k8 - k0);
    if (pack) {
      PackPanel<DType::kF32>(x + k0, p.ldx, mb, kc, kMaxTileRows, s.xpanel.data());
      PackPanel<W>(w + k0, p.k, nb, kc, kPackCols, s.wpanel.data());
      SweepPacked(s.xpanel.data(), mb, s.wpanel.data(), nb, kc, acc);
    } else {
      SweepBlock<W>(x, p.ldx, mb, k0, w + k0, p.k, nb, kc, acc);
    }
  }
  for (int64_t a = 0; a < mb; ++a) {
    const float* xr = x + a * p.ldx;
    float* yr = p.y + (m0 + a) * p.ldy + n0;
    for (int64_t r = 0; r < nb; ++r) {
      float sum = SumLanes(acc + (a * nb + r) * kLanes);
      const WElem<W>* wr = w + r * p.k;
      for (int64_t c = k8; c < p.k; ++c) sum = MulAdd(xr[c], WidenOne<W>(wr[c]), sum);
      yr[r] = sum + (p.bias != nullptr ? p.bias[n0 + r] : 0.0f);
    }
  }
}

template <DType W>
void Run(const LinearParams& p) {
  const int64_t m_blocks = (p.m + kMb - 1) / kMb;
  const int64_t wanted_items = 4 * static_cast<int64_t>(PoolThreads());
  int64_t nb = kNbChoices[0];
  for (int64_t choice : kNbChoices) {
    nb = choice;
    if (m_blocks * ((p.n + nb - 1) / nb) >= wanted_items) break;
  }
  const int64_t n_blocks = (p.n + nb - 1) / nb;
  const int64_t items = m_blocks * n_blocks;
  const int64_t workers = std::min<int64_t>(
      {PoolThreads(), items, std::max<int64_t>(1, p.m * p.n * p.k / kMinMacsPerChunk)});
  // Items are handed out one at a time, so a worker that is descheduled (a shared machine) or
  // slow does not hold the others up. Item i is (column block i / m_blocks, row block
  // i % m_blocks): workers move through the column blocks together, sharing each w block in
  // cache. Which worker runs an item cannot change its result.
  std::atomic<int64_t> next{0};
  ParallelFor(workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t m0 = (i % m_blocks) * kMb, n0 = (i / m_blocks) * nb;
      RunBlock<W>(p, m0, std::min(kMb, p.m - m0), n0, std::min(nb, p.n - n0), scratch);
    }
  });
}

}  // namespace

void LinearInvariant(const LinearParams& p) {
  switch (p.w_dtype) {
    case DType::kBF16:
      Run<DType::kBF16>(p);
      return;
    case DType::kF16:
      Run<DType::kF16>(p);
      return;
    default:
      Run<DType::kF32>(p);
      return;
  }
}

}  // namespace cleave::kernels::cpu
