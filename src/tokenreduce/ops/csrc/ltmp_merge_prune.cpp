// Fused CPU kernel: LTMP's inference step (threshold merge, threshold prune, compaction) in one call.
//
// The same rule and the same numbers as LTMP._reduce_hard in tokenreduce/methods/ltmp.py, which at
// batch 1 is ~80 small ATen ops whose fixed costs outweigh their arithmetic.  The cosine similarities come
// in computed, or the kernel computes them from the keys, image by image and row by row (ImageCosines: the head
// mean, the unit rows and the dot products, never the whole B×NA×NB matrix; they agree with LTMP._similarity to
// rounding, ~1e-7).  Everything after them gives the Python path's numbers bit for bit:
//
//   * every A token (even position) that is live and not a prefix token takes its best live, non-prefix
//     B partner (odd position; first maximum, NaN first, as torch.max); it merges iff best > θ_merge;
//   * B tokens: x_b' = (s_b·x_b + Σ_{a→b} s_a·x_a) / (s_b + Σ_{a→b} s_a), the sum in ascending a, as the
//     Python path's index_add (built without FMA contraction, so products and sums round the same);
//   * importance of a B token: the maximum over itself and the A tokens merged into it;
//   * a token stays iff it is live, not merged away, and its importance > θ_prune (prefix tokens stay);
//   * compaction: live tokens first, then dead ones, each in the layout order [prefix, A, B], cut to the
//     largest live count in the batch.
//
// Packed form (the reduced model's packed stream): the input x holds only the live tokens, ΣN×C, image by
// image, and every image's live tokens are its first counts[b] positions (the compaction above gives that
// layout); the output x holds only the live output tokens, ΣM×C, in the same way, and rows gives their rows in
// the B·M flattening.  Sizes, mask and positions stay B×M; only the hidden states are packed.
//
// Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in module.cpp.

#include "kernels.h"
#include "rows.h"

#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// The keys of a batch as the kernel reads them: B×H×N×d with a unit last stride (3-D keys are one head).
struct KeyView {
  at::Tensor keys;
  const float* data;
  int64_t batch, heads, n, dim;

  explicit KeyView(const at::Tensor& keys_in) {
    TORCH_CHECK(keys_in.dim() == 3 || keys_in.dim() == 4, "ltmp: keys must be 3-D or 4-D");
    TORCH_CHECK(keys_in.device().is_cpu() && keys_in.scalar_type() == at::kFloat, "ltmp: float32 CPU keys only");
    const at::Tensor per_head = keys_in.dim() == 4 ? keys_in : keys_in.unsqueeze(1);
    keys = per_head.stride(3) == 1 ? per_head : per_head.contiguous();
    data = keys.data_ptr<float>();
    batch = keys.size(0), heads = keys.size(1), n = keys.size(2), dim = keys.size(3);
  }
};

// One image's keys ready for its A-to-B cosines: the unit rows of the A (even) positions, ⌈N/2⌉×d, and those of
// the B (odd) positions transposed, d×⌊N/2⌋ padded with zero columns to a multiple of 8, so that one A row's
// cosines with every B row are vector operations over the B rows.  Buffers are reused from image to image.
class ImageCosines {
 public:
  explicit ImageCosines(const KeyView& view)
      : view_(view), na_((view.n + 1) / 2), nb_(view.n / 2), nb_padded_((nb_ + kLanes - 1) / kLanes * kLanes) {
    a_.resize(na_ * view.dim);
    b_t_.assign(view.dim * nb_padded_, 0.f);  // the padding columns stay 0
    row_.resize(view.dim);
  }

  // Unit rows of image `img`'s keys (unit_key: heads summed, which has the head mean's direction), in one pass over
  // its tokens: A rows into a_, B rows into the columns of b_t_.
  void load(int64_t img) {
    const int64_t dim = view_.dim;
    const float* image = view_.data + img * view_.keys.stride(0);
    const int64_t token_stride = view_.keys.stride(2);
    for (int64_t t = 0; t < view_.n; ++t) {
      float* unit = t % 2 == 0 ? a_.data() + (t / 2) * dim : row_.data();
      unit_key(image + t * token_stride, unit);
      if (t % 2 == 1) {
        for (int64_t d = 0; d < dim; ++d) b_t_[d * nb_padded_ + t / 2] = unit[d];
      }
    }
  }

  // The cosines of A row i with every B row, at most 1 (a merge threshold of 1 then merges nothing, see LTMP's
  // module note; NaN stays), into out (⌊N/2⌋ floats): each a sum over d in order.  The B columns go in blocks whose
  // sums stay in registers for the whole loop over d (columns_block).
  void row(int64_t i, float* __restrict__ out) const {
    const float* a = a_.data() + i * view_.dim;
    int64_t j = 0;
    for (; j + kWide <= nb_padded_; j += kWide) columns_block<kWide>(a, j, out);
    for (; j + kWide / 2 <= nb_padded_; j += kWide / 2) columns_block<kWide / 2>(a, j, out);
    for (; j < nb_padded_; j += kLanes) columns_block<kLanes>(a, j, out);
  }

 private:
  static constexpr int64_t kLanes = 8;  // B columns are padded to a multiple of this (one AVX2 register)
  static constexpr int64_t kWide = 64;  // B columns per block where that many are left (eight AVX2 registers)

  // One token's unit key (dim floats) into out: the sum of its heads (head h at row + h * head stride) scaled to
  // unit length.  The cosines are those of the head means (unit_rows(head_mean(keys)) in LTMP._similarity) to
  // rounding: a mean is the sum over H, and the norm's lower clamp scales with it (H·eps for the sum, eps for the
  // mean).  One reciprocal and a multiply per row, not a division per element.
  void unit_key(const float* __restrict__ row, float* __restrict__ out) const {
    const int64_t dim = view_.dim, heads = view_.heads, head_stride = view_.keys.stride(1);
    for (int64_t d = 0; d < dim; ++d) out[d] = row[d];
    for (int64_t h = 1; h < heads; ++h) {
      const float* __restrict__ head_row = row + h * head_stride;
      for (int64_t d = 0; d < dim; ++d) out[d] += head_row[d];
    }
    const float norm = std::sqrt(tokenreduce::sum_of_squares(out, dim));
    const float scale = 1.f / std::max(norm, tokenreduce::kNormEps * static_cast<float>(heads));
    for (int64_t d = 0; d < dim; ++d) out[d] *= scale;
  }

  // The cosines of A row `a` with B columns j0 .. j0 + width - 1 (those below ⌊N/2⌋ are written to out + j0).  With
  // AVX2 and FMA, width / 8 registers of sums, one fused multiply-add per d (the file is built without contraction,
  // so the portable loop multiplies and adds); the cosines differ from LTMP._similarity's by rounding either way.
  template <int64_t width>
  void columns_block(const float* __restrict__ a, int64_t j0, float* __restrict__ out) const {
    const float* __restrict__ b_t = b_t_.data() + j0;
#if defined(__AVX2__) && defined(__FMA__)
    constexpr int64_t vectors = width / kLanes;
    __m256 sum[vectors];
    for (int64_t v = 0; v < vectors; ++v) sum[v] = _mm256_setzero_ps();
    for (int64_t d = 0; d < view_.dim; ++d) {
      const __m256 a_d = _mm256_set1_ps(a[d]);
      const float* __restrict__ b_d = b_t + d * nb_padded_;
      for (int64_t v = 0; v < vectors; ++v) sum[v] = _mm256_fmadd_ps(a_d, _mm256_loadu_ps(b_d + v * kLanes), sum[v]);
    }
    float flat[width];
    for (int64_t v = 0; v < vectors; ++v) _mm256_storeu_ps(flat + v * kLanes, sum[v]);
#else
    float flat[width] = {};
    for (int64_t d = 0; d < view_.dim; ++d) {
      const float a_d = a[d];
      const float* __restrict__ b_d = b_t + d * nb_padded_;
      for (int64_t k = 0; k < width; ++k) flat[k] += a_d * b_d[k];
    }
#endif
    const int64_t valid = std::min(width, nb_ - j0);
    for (int64_t k = 0; k < valid; ++k) out[j0 + k] = flat[k] > 1.f ? 1.f : flat[k];
  }

  const KeyView& view_;
  int64_t na_, nb_, nb_padded_;
  std::vector<float> a_, b_t_, row_;  // b_t_: d×nb_padded_, the B unit rows transposed
};

}  // namespace

// keys: B×N×d float32 keys, or B×H×N×d per-head keys (any strides with a unit last one), whose cosines are those of
// their mean over H (tokenreduce.ops.gather.head_mean).  Returns the B×⌈N/2⌉×⌊N/2⌋ float32 cosine similarities of
// the even (A) to the odd (B) positions, prefix and dead ones included, clamped at 1: what ltmp_merge_prune computes
// from keys (LTMP._similarity's numbers to rounding: ImageCosines' unit keys, each cosine a sum over d in order).
at::Tensor ltmp_similarities(const at::Tensor& keys_in) {
  const KeyView view(keys_in);
  const int64_t na = (view.n + 1) / 2, nb = view.n / 2;
  at::Tensor sim = at::empty({view.batch, na, nb}, view.keys.options());
  float* sim_data = sim.data_ptr<float>();
  at::parallel_for(0, view.batch, 1, [&](int64_t begin, int64_t end) {
    ImageCosines cosines(view);
    for (int64_t img = begin; img < end; ++img) {
      cosines.load(img);
      for (int64_t i = 0; i < na; ++i) cosines.row(i, sim_data + (img * na + i) * nb);
    }
  });
  return sim;
}

// x: B×N×C float32, or ΣN×C live rows with counts; size: B×N×1 float32 or None (all ones); sim: B×NA×NB float32
// cosine similarities of the A (even) and B (odd) positions, at most 1 (as LTMP._similarity clamps them), prefix
// and dead tokens included (they are masked here); importance: B×N float32, or None where the block cannot prune
// (every token's importance is +inf);
// mask: B×N×1 float32 live mask (live: > 0) or None (all live; with counts: the first counts[b] positions);
// p: prefix tokens; multiple: the padded length M is the largest live count rounded up to a multiple of this
// (at most N); counts: B int64 live counts of a packed input x, or None; packed: return the output x packed;
// from_keys: sim holds the keys instead (3-D or 4-D, see ltmp_similarities), and the kernel computes the
// similarities first; with_index: return the input positions; with_log_size: return the log of the sizes as the
// B×1×1×M proportional-attention bias (tokenreduce.ops.attention.size_bias: the same ATen op, no Python call).
// Returns (B×M×C or ΣM×C x, B×M×1 sizes, B×M×1 float live mask (undefined where every output row is live),
// B×M int64 input positions (undefined without with_index), B int64 live counts and ΣM int64 rows of the live
// output tokens in the B·M flattening (both packed only, else undefined), B×1×1×M log sizes (undefined without
// with_log_size)).  Undefined tensors reach Python as None.
LtmpStep ltmp_merge_prune(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in, const at::Tensor& sim_in,
                          const c10::optional<at::Tensor>& importance_in, const c10::optional<at::Tensor>& mask_in,
                          double theta_merge, double theta_prune, int64_t p, int64_t multiple,
                          const c10::optional<at::Tensor>& counts_in, bool packed_out, bool from_keys,
                          bool with_index, bool with_log_size) {
  const bool has_importance = importance_in.has_value() && importance_in->defined();
  const bool packed_in = counts_in.has_value() && counts_in->defined();
  TORCH_CHECK(x_in.dim() == (packed_in ? 2 : 3) && (from_keys || sim_in.dim() == 3),
              "ltmp_merge_prune: x must be 3-D (2-D with counts) and sim 3-D");
  TORCH_CHECK(x_in.device().is_cpu() && sim_in.device().is_cpu(), "ltmp_merge_prune: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && sim_in.scalar_type() == at::kFloat,
              "ltmp_merge_prune: float32 tensors only");
  TORCH_CHECK(!packed_in || packed_out, "ltmp_merge_prune: a packed input gives a packed output");
  const at::Tensor x = x_in.contiguous();
  // the similarities come in (sim), or each image's are computed row by row from the keys (key_view)
  const at::Tensor sim = from_keys ? at::Tensor() : sim_in.contiguous();
  const c10::optional<KeyView> key_view = from_keys ? c10::optional<KeyView>(KeyView(sim_in)) : c10::nullopt;
  const int64_t batch = from_keys ? key_view->batch : sim.size(0);
  const int64_t n = from_keys ? key_view->n : sim.size(1) + sim.size(2), channels = x.size(-1);
  const int64_t na = (n + 1) / 2, nb = n / 2;
  TORCH_CHECK((from_keys || (sim.size(1) == na && sim.size(2) == nb)) &&
                  (packed_in || (x.size(0) == batch && x.size(1) == n)),
              "ltmp_merge_prune: sim must be B×ceil(N/2)×floor(N/2) and x B×N×C");
  // where every image's rows start in x: b·N (padded) or the running sum of the live counts (packed)
  std::vector<int64_t> x_start(batch), in_count(batch, n);
  if (packed_in) {
    const at::Tensor counts = counts_in->to(at::kLong).contiguous();
    TORCH_CHECK(counts.numel() == batch, "ltmp_merge_prune: counts must hold one count per image");
    const int64_t* counts_data = counts.data_ptr<int64_t>();
    int64_t start = 0;
    for (int64_t img = 0; img < batch; ++img) {
      TORCH_CHECK(counts_data[img] >= 0 && counts_data[img] <= n, "ltmp_merge_prune: a count is out of range");
      x_start[img] = start;
      in_count[img] = counts_data[img];
      start += counts_data[img];
    }
    TORCH_CHECK(start == x.size(0), "ltmp_merge_prune: the counts must sum to x's rows");
  } else {
    for (int64_t img = 0; img < batch; ++img) x_start[img] = img * n;
  }
  at::Tensor importance;
  if (has_importance) {
    importance = importance_in->contiguous();
    TORCH_CHECK(importance.device().is_cpu() && importance.scalar_type() == at::kFloat && importance.dim() == 2 &&
                    importance.size(0) == batch && importance.size(1) == n,
                "ltmp_merge_prune: importance must be a B×N float32 CPU tensor");
  }
  TORCH_CHECK(p >= 0 && p <= n, "ltmp_merge_prune: bad prefix count");
  TORCH_CHECK(multiple >= 1, "ltmp_merge_prune: multiple must be >= 1");

  at::Tensor size, mask;
  const bool has_size = size_in.has_value() && size_in->defined();
  const bool has_mask = mask_in.has_value() && mask_in->defined();
  if (has_size) {
    size = size_in->contiguous();
    TORCH_CHECK(size.scalar_type() == at::kFloat && size.numel() == batch * n,
                "ltmp_merge_prune: size must be a B×N×1 float32 tensor");
  }
  if (has_mask) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.numel() == batch * n,
                "ltmp_merge_prune: mask must be a B×N×1 float32 tensor");
  }
  const float* x_data = x.data_ptr<float>();
  const float* size_data = has_size ? size.data_ptr<float>() : nullptr;
  const float* mask_data = has_mask ? mask.data_ptr<float>() : nullptr;
  const float* sim_data = from_keys ? nullptr : sim.data_ptr<float>();
  const float* imp_data = has_importance ? importance.data_ptr<float>() : nullptr;
  const float th_merge = static_cast<float>(theta_merge), th_prune = static_cast<float>(theta_prune);
  // a merge threshold of 1 or more (learned thresholds saturate there) cannot fire: the similarities are skipped
  const bool can_merge = !(th_merge >= 1.f);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // The layout order: prefix positions, then the non-prefix even (A) and odd (B) positions.
  std::vector<int64_t> layout;
  layout.reserve(n);
  for (int64_t t = 0; t < p; ++t) layout.push_back(t);
  for (int64_t t = 2 * ((p + 1) / 2); t < n; t += 2) layout.push_back(t);
  for (int64_t t = 2 * (p / 2) + 1; t < n; t += 2) layout.push_back(t);

  // Phase 1, per image: decisions and the A tokens merging into every B token (linked lists, ascending a).
  std::vector<uint8_t> alive(batch * n);
  std::vector<int64_t> first(batch * std::max<int64_t>(nb, 1)), next(batch * std::max<int64_t>(na, 1));
  std::vector<int64_t> count(batch);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> live(n), merged(na);
    std::vector<int64_t> partner(na), last(std::max<int64_t>(nb, 1));
    c10::optional<ImageCosines> cosines;
    std::vector<float> cosine_row;
    if (from_keys) {
      cosines.emplace(*key_view);
      cosine_row.resize(nb);
    }
    for (int64_t img = begin; img < end; ++img) {
      for (int64_t t = 0; t < n; ++t) live[t] = t < in_count[img] && (!has_mask || mask_data[img * n + t] > 0.f);
      if (from_keys && can_merge) cosines->load(img);
      // A row i's similarities with every B token: computed now from the keys, or read from sim
      auto sim_row = [&](int64_t i) -> const float* {
        if (!from_keys) return sim_data + (img * na + i) * nb;
        cosines->row(i, cosine_row.data());
        return cosine_row.data();
      };
      const float* imp = has_importance ? imp_data + img * n : nullptr;  // nullptr: +inf, nothing pruned
      int64_t* img_first = first.data() + img * std::max<int64_t>(nb, 1);
      int64_t* img_next = next.data() + img * std::max<int64_t>(na, 1);
      std::fill(img_first, img_first + nb, int64_t{-1});
      bool every_b = true;  // every B token may be a partner: the plain first maximum of a row
      for (int64_t j = 0; j < nb; ++j) every_b = every_b && 2 * j + 1 >= p && live[2 * j + 1];
      for (int64_t i = 0; i < na; ++i) {
        float best = neg_inf;
        int64_t best_j = 0;
        if (!can_merge) {
          // no similarity exceeds the threshold (cosines are at most 1, NaN exceeds nothing): none computed
        } else if (2 * i >= p && live[2 * i] && nb > 0 && every_b) {
          const float* row = sim_row(i);
          best_j = tokenreduce::first_argmax(row, nb);
          best = row[best_j];
        } else if (2 * i >= p && live[2 * i] && nb > 0) {
          const float* row = sim_row(i);
          for (int64_t j = 0; j < nb; ++j) {
            const float value = (2 * j + 1 >= p && live[2 * j + 1]) ? row[j] : neg_inf;
            if (j == 0) {
              best = value;
            } else if (std::isnan(best)) {
              break;
            } else if (std::isnan(value) || value > best) {
              best = value;
              best_j = j;
            }
          }
        }
        merged[i] = best > th_merge;
        partner[i] = best_j;
        img_next[i] = -1;
        if (merged[i]) {
          if (img_first[best_j] < 0) {
            img_first[best_j] = i;
          } else {
            img_next[last[best_j]] = i;
          }
          last[best_j] = i;
        }
      }
      uint8_t* img_alive = alive.data() + img * n;
      for (int64_t i = 0; i < na; ++i) {
        const int64_t t = 2 * i;
        img_alive[t] = live[t] && !merged[i] && (imp == nullptr || imp[t] > th_prune || t < p);
      }
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t t = 2 * j + 1;
        if (imp == nullptr) {
          img_alive[t] = live[t];
          continue;
        }
        float group = imp[t];
        for (int64_t i = img_first[j]; i >= 0; i = img_next[i]) {
          const float value = imp[2 * i];
          if (std::isnan(value) || value > group) group = value;
        }
        img_alive[t] = live[t] && (group > th_prune || t < p);
      }
      int64_t live_count = 0;
      for (int64_t t = 0; t < n; ++t) live_count += img_alive[t];
      count[img] = live_count;
    }
  });
  const int64_t longest = batch > 0 ? *std::max_element(count.begin(), count.end()) : 0;
  const int64_t m_out = std::min(n, (longest + multiple - 1) / multiple * multiple);

  // Phase 2, per image: the first M tokens of the compaction order, B tokens with their merges (packed: the
  // live ones' hidden states only).
  std::vector<int64_t> out_start(batch);
  int64_t live_rows = 0;
  for (int64_t img = 0; img < batch; ++img) {
    out_start[img] = packed_out ? live_rows : img * m_out;
    live_rows += count[img];
  }
  bool all_live = true;
  for (int64_t img = 0; img < batch; ++img) all_live = all_live && count[img] == m_out;
  // only what the caller reads is allocated (an allocation costs about what a small op does at batch 1): the
  // mask where a row is dead, the counts and the live rows for a packed output
  at::Tensor out = packed_out ? at::empty({live_rows, channels}, x.options())
                              : at::empty({batch, m_out, channels}, x.options());
  at::Tensor out_size = at::empty({batch, m_out, 1}, x.options());
  at::Tensor out_mask = all_live ? at::Tensor() : at::empty({batch, m_out, 1}, x.options());
  at::Tensor index = with_index ? at::empty({batch, m_out}, x.options().dtype(at::kLong)) : at::Tensor();
  at::Tensor out_count = packed_out ? at::empty({batch}, x.options().dtype(at::kLong)) : at::Tensor();
  at::Tensor rows = packed_out ? at::empty({live_rows}, x.options().dtype(at::kLong)) : at::Tensor();
  float* out_data = out.data_ptr<float>();
  float* out_size_data = out_size.data_ptr<float>();
  float* out_mask_data = all_live ? nullptr : out_mask.data_ptr<float>();
  int64_t* index_data = with_index ? index.data_ptr<int64_t>() : nullptr;
  int64_t* rows_data = packed_out ? rows.data_ptr<int64_t>() : nullptr;
  if (packed_out) std::copy(count.begin(), count.end(), out_count.data_ptr<int64_t>());
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(channels);
    for (int64_t img = begin; img < end; ++img) {
      const uint8_t* img_alive = alive.data() + img * n;
      const int64_t* img_first = first.data() + img * std::max<int64_t>(nb, 1);
      const int64_t* img_next = next.data() + img * std::max<int64_t>(na, 1);
      const float* img_x = x_data + x_start[img] * channels;
      const float* img_size = has_size ? size_data + img * n : nullptr;
      auto size_of = [&](int64_t t) { return img_size != nullptr ? img_size[t] : 1.f; };
      int64_t row = 0;
      auto emit = [&](int64_t t) {
        // a dead token's hidden state is written only in the padded form (packed: nothing to read or write)
        const bool write = !packed_out || img_alive[t];
        float* dst = out_data + (out_start[img] + row) * channels;
        const float* src = img_x + t * channels;
        float total = size_of(t);
        if (t % 2 == 0) {
          if (write) std::copy(src, src + channels, dst);
        } else if (img_first[t / 2] < 0 && total == 1.f) {
          // nothing merged into a unit-size token: (1·x + 0) / 1 below is x + 0 exactly (−0 turns into +0 there
          // too), without a division per element
          if (write) {
            for (int64_t c = 0; c < channels; ++c) dst[c] = src[c] + 0.f;
          }
        } else {
          if (write) std::fill(acc.begin(), acc.end(), 0.f);
          float merged_size = 0.f;
          for (int64_t i = img_first[t / 2]; i >= 0; i = img_next[i]) {
            const float w = size_of(2 * i);
            if (write) {
              const float* a = img_x + 2 * i * channels;
              for (int64_t c = 0; c < channels; ++c) acc[c] += w * a[c];
            }
            merged_size += w;
          }
          const float own = total;
          total = own + merged_size;
          if (write) {
            for (int64_t c = 0; c < channels; ++c) dst[c] = (own * src[c] + acc[c]) / total;
          }
        }
        out_size_data[img * m_out + row] = total;
        if (out_mask_data != nullptr) out_mask_data[img * m_out + row] = img_alive[t] ? 1.f : 0.f;
        if (index_data != nullptr) index_data[img * m_out + row] = t;
        if (packed_out && img_alive[t]) rows_data[out_start[img] + row] = img * m_out + row;
        ++row;
      };
      for (int64_t k = 0; k < n && row < m_out; ++k) {
        if (img_alive[layout[k]]) emit(layout[k]);
      }
      for (int64_t k = 0; k < n && row < m_out; ++k) {
        if (!img_alive[layout[k]]) emit(layout[k]);
      }
    }
  });
  at::Tensor log_size = with_log_size ? at::log(out_size).view({batch, 1, 1, m_out}) : at::Tensor();
  return {out, out_size, out_mask, index, out_count, rows, log_size};
}
