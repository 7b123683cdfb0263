// Fused CPU kernel: a padded batch's attention in length buckets, with the lower bound on the attention every
// key receives, in one call.
//
// The same steps as tokenreduce.ops.attention.attend_bucketed's Python path (ops/buckets.py, ops/received.py),
// which runs ~60 small ATen ops per block around the flash kernel:
//
//   * every image's length is its last live position + 1, rounded up to `multiple` (at most N); the bucket
//     lengths come from the same dynamic programme as buckets.plan_buckets (the same doubles, the same ties);
//   * each bucket's q, k, v are gathered into m×H×L×d buffers (dead and padding positions zero, their keys
//     removed with a −inf mask; live keys carry the size bias) and ATen's CPU flash kernel runs on them;
//   * per image, the Jensen bound of received.received_log_lower_bound from the rows' log-sum-exp; an image
//     whose live keys all clear log(floor) + margin is certified and gets exp(bound); any other image gets the
//     exact received attention from an explicit softmax (received.attention_and_received's formula);
//   * the outputs go back to the live rows (heads concatenated), and the head-mean keys (tokenreduce.ops.gather.
//     head_mean's sum order: ((k0 + k1) + k2) + …, then / H) to a zeroed B×N×d tensor.
//
// Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in module.cpp.

#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// buckets.plan_buckets: the bucket lengths, shortest first, for a histogram indexed by length.
std::vector<int64_t> plan_buckets(const std::vector<int64_t>& histogram, int64_t heads, int64_t head_dim,
                                  double overhead) {
  std::vector<int64_t> distinct;
  for (int64_t length = 0; length < static_cast<int64_t>(histogram.size()); ++length) {
    if (histogram[length] > 0) distinct.push_back(length);
  }
  const size_t k = distinct.size();
  std::vector<double> best(k + 1, std::numeric_limits<double>::infinity());
  std::vector<size_t> cut(k + 1, 0);
  best[0] = 0.0;
  for (size_t j = 1; j <= k; ++j) {
    const double length = static_cast<double>(distinct[j - 1]);
    const double per_image = 2.0 * static_cast<double>(heads) * length * length * static_cast<double>(head_dim);
    int64_t images = 0;
    for (size_t i = j; i-- > 0;) {
      images += histogram[distinct[i]];
      const double cost = best[i] + static_cast<double>(images) * per_image + overhead;
      if (cost < best[j]) {
        best[j] = cost;
        cut[j] = i;
      }
    }
  }
  std::vector<int64_t> lengths;
  for (size_t j = k; j > 0; j = cut[j]) lengths.push_back(distinct[j - 1]);
  std::reverse(lengths.begin(), lengths.end());
  return lengths;
}

}  // namespace

// qkv: ΣN×3×H×d float32 live rows (q, k, v); packed: ΣN int64 rows of the B·N flattening, increasing;
// live: B×N float32 live mask (live: > 0); bias: B×N float32 additive key bias (log size) or None;
// scale: the logit scale; log_floor: an image is certified where every live key's log bound exceeds this
// (log(floor) + margin, compared in float32); multiple: lengths round up to a multiple of this (at most N);
// overhead: a bucket's fixed cost in multiply-adds; keys: also return the head-mean keys; bound: compute the
// received attention (else it stays 0 and every image counts as certified).
// Returns (ΣN×(H·d) outputs, B×N float32 received attention (0 at dead positions), B bool certified,
// B×N×d head-mean keys (0 at dead positions) or an empty tensor, the bucket lengths (int64)).
BucketedAttention bucketed_attention(const at::Tensor& qkv_in, const at::Tensor& packed_in, const at::Tensor& live_in,
                                     const c10::optional<at::Tensor>& bias_in, double scale, double log_floor,
                                     int64_t multiple, double overhead, bool keys, bool bound) {
  TORCH_CHECK(qkv_in.dim() == 4 && qkv_in.size(1) == 3, "bucketed_attention: qkv must be ΣN×3×H×d");
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat && live_in.scalar_type() == at::kFloat,
              "bucketed_attention: float32 tensors only");
  TORCH_CHECK(qkv_in.device().is_cpu() && packed_in.device().is_cpu() && live_in.device().is_cpu(),
              "bucketed_attention: CPU tensors only");
  TORCH_CHECK(live_in.dim() == 2, "bucketed_attention: live must be B×N");
  TORCH_CHECK(multiple >= 1, "bucketed_attention: multiple must be >= 1");
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor packed = packed_in.to(at::kLong).contiguous();
  const at::Tensor live = live_in.contiguous();
  const int64_t batch = live.size(0), n = live.size(1), total = qkv.size(0), heads = qkv.size(2),
                dim = qkv.size(3);
  TORCH_CHECK(packed.numel() == total, "bucketed_attention: one packed row per qkv row");
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  at::Tensor bias;
  if (has_bias) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == batch * n, "bucketed_attention: bias must be B×N");
  }
  const float* qkv_data = qkv.data_ptr<float>();
  const int64_t* packed_data = packed.data_ptr<int64_t>();
  const float* live_data = live.data_ptr<float>();
  const float* bias_data = has_bias ? bias.data_ptr<float>() : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float threshold = static_cast<float>(log_floor);
  const float log_heads = static_cast<float>(std::log(static_cast<double>(heads)));

  // Every position's row (−1: none), every image's length.
  std::vector<int64_t> row_of(batch * n, -1), length(batch, 1);
  for (int64_t r = 0; r < total; ++r) {
    const int64_t flat = packed_data[r];
    TORCH_CHECK(flat >= 0 && flat < batch * n && (r == 0 || flat > packed_data[r - 1]),
                "bucketed_attention: packed rows must increase within B·N");
    row_of[flat] = r;
    length[flat / n] = std::max(length[flat / n], flat % n + 1);
  }
  std::vector<int64_t> histogram(n + 1, 0), rounded(batch);
  for (int64_t b = 0; b < batch; ++b) {
    rounded[b] = std::min(n, (length[b] + multiple - 1) / multiple * multiple);
    ++histogram[rounded[b]];
  }
  const std::vector<int64_t> caps = plan_buckets(histogram, heads, dim, overhead);
  std::vector<std::vector<int64_t>> members(caps.size());
  for (int64_t b = 0; b < batch; ++b) {
    const size_t k = std::lower_bound(caps.begin(), caps.end(), rounded[b]) - caps.begin();
    members[k].push_back(b);
  }

  at::Tensor out = at::empty({total, heads * dim}, qkv.options());
  at::Tensor received = at::zeros({batch, n}, qkv.options());
  at::Tensor certified = at::empty({batch}, qkv.options().dtype(at::kBool));
  at::Tensor key_mean = keys ? at::zeros({batch, n, dim}, qkv.options()) : at::empty({0}, qkv.options());
  float* out_data = out.data_ptr<float>();
  float* received_data = received.data_ptr<float>();
  bool* certified_data = certified.data_ptr<bool>();
  float* keys_data = keys ? key_mean.data_ptr<float>() : nullptr;
  const int64_t row_stride = 3 * heads * dim;

  for (size_t k = 0; k < caps.size(); ++k) {
    const std::vector<int64_t>& images = members[k];
    const int64_t m = static_cast<int64_t>(images.size()), len = caps[k];
    if (m == 0) continue;
    at::Tensor buffer = at::empty({3, m, heads, len, dim}, qkv.options());
    at::Tensor mask = at::empty({m, 1, 1, len}, qkv.options());
    float* buffer_data = buffer.data_ptr<float>();
    float* mask_data = mask.data_ptr<float>();
    const int64_t part = m * heads * len * dim;  // q, k, v one after the other
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t b = images[j];
        for (int64_t t = 0; t < len; ++t) {
          const int64_t r = row_of[b * n + t];
          const bool is_live = r >= 0 && live_data[b * n + t] > 0.f;
          mask_data[j * len + t] = is_live ? (has_bias ? bias_data[b * n + t] : 0.f) : neg_inf;
          for (int64_t s = 0; s < 3; ++s) {
            for (int64_t h = 0; h < heads; ++h) {
              float* dst = buffer_data + s * part + ((j * heads + h) * len + t) * dim;
              if (is_live) {
                const float* src = qkv_data + r * row_stride + (s * heads + h) * dim;
                std::copy(src, src + dim, dst);
              } else {
                std::fill(dst, dst + dim, 0.f);
              }
            }
          }
        }
      }
    });
    const at::Tensor q = buffer[0], key = buffer[1], v = buffer[2];
    // the log-sum-exp comes with the kernel's output either way
    auto result = at::_scaled_dot_product_flash_attention_for_cpu(q, key, v, 0.0, false, mask, scale);
    const at::Tensor& flash = std::get<0>(result);
    const at::Tensor lse = std::get<1>(result).to(at::kFloat);
    const float* flash_data = flash.data_ptr<float>();
    const float* lse_data = lse.data_ptr<float>();
    const int64_t fs0 = flash.stride(0), fs1 = flash.stride(1), fs2 = flash.stride(2), fs3 = flash.stride(3);
    const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
    const float* q_data = buffer_data;
    const float* k_data = buffer_data + part;

    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> mean_q(heads * dim), mean_lse(heads), log_bound(len), exact(len), logits(len);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t b = images[j];
        const float* img_mask = mask_data + j * len;
        if (!bound) {
          certified_data[b] = true;
        } else {
          int64_t live_rows = 0;
          for (int64_t t = 0; t < len; ++t) live_rows += img_mask[t] != neg_inf;
          const float w = live_rows > 0 ? 1.f / static_cast<float>(live_rows) : 0.f;
          // the live query rows' mean query and mean log-sum-exp, per head
          std::fill(mean_q.begin(), mean_q.end(), 0.f);
          std::fill(mean_lse.begin(), mean_lse.end(), 0.f);
          for (int64_t h = 0; h < heads; ++h) {
            const float* qh = q_data + (j * heads + h) * len * dim;
            for (int64_t t = 0; t < len; ++t) {
              if (img_mask[t] == neg_inf) continue;
              for (int64_t e = 0; e < dim; ++e) mean_q[h * dim + e] += w * qh[t * dim + e];
              mean_lse[h] += w * lse_data[j * ls0 + h * ls1 + t * ls2];
            }
          }
          bool certain = true;
          for (int64_t t = 0; t < len; ++t) {
            if (img_mask[t] == neg_inf) continue;
            float best = neg_inf;
            for (int64_t h = 0; h < heads; ++h) {
              const float* kh = k_data + ((j * heads + h) * len + t) * dim;
              float dot = 0.f;
              for (int64_t e = 0; e < dim; ++e) dot += kh[e] * mean_q[h * dim + e];
              best = std::max(best, dot * static_cast<float>(scale) - mean_lse[h]);
            }
            log_bound[t] = best - log_heads + img_mask[t];
            certain = certain && log_bound[t] > threshold;
          }
          certified_data[b] = certain;
          float* img_received = received_data + b * n;
          if (certain) {
            for (int64_t t = 0; t < len; ++t) img_received[t] = img_mask[t] == neg_inf ? 0.f : std::exp(log_bound[t]);
          } else {  // the explicit softmax: Σ_h Σ_i live P_h[i, t] / (H · live rows)
            std::fill(exact.begin(), exact.end(), 0.f);
            for (int64_t h = 0; h < heads; ++h) {
              const float* qh = q_data + (j * heads + h) * len * dim;
              const float* kh = k_data + (j * heads + h) * len * dim;
              for (int64_t i = 0; i < len; ++i) {
                if (img_mask[i] == neg_inf) continue;
                float top = neg_inf;
                for (int64_t t = 0; t < len; ++t) {
                  float dot = 0.f;
                  for (int64_t e = 0; e < dim; ++e) dot += qh[i * dim + e] * kh[t * dim + e];
                  logits[t] = dot * static_cast<float>(scale) + img_mask[t];
                  top = std::max(top, logits[t]);
                }
                float sum = 0.f;
                for (int64_t t = 0; t < len; ++t) {
                  logits[t] = std::exp(logits[t] - top);
                  sum += logits[t];
                }
                for (int64_t t = 0; t < len; ++t) exact[t] += logits[t] / sum;
              }
            }
            const float denom = static_cast<float>(heads) * static_cast<float>(live_rows);
            for (int64_t t = 0; t < len; ++t) img_received[t] = img_mask[t] == neg_inf ? 0.f : exact[t] / denom;
          }
        }
        // outputs to the live rows (heads concatenated); head-mean keys
        for (int64_t t = 0; t < len; ++t) {
          const int64_t r = row_of[b * n + t];
          if (r < 0) continue;
          float* dst = out_data + r * heads * dim;
          for (int64_t h = 0; h < heads; ++h) {
            const float* src = flash_data + j * fs0 + h * fs1 + t * fs2;
            for (int64_t e = 0; e < dim; ++e) dst[h * dim + e] = src[e * fs3];
          }
          if (keys_data != nullptr) {
            const float* src = qkv_data + r * row_stride + heads * dim;  // k, head 0
            float* key_dst = keys_data + (b * n + t) * dim;
            for (int64_t e = 0; e < dim; ++e) {
              float sum = heads > 1 ? src[e] + src[dim + e] : src[e];
              for (int64_t h = 2; h < heads; ++h) sum += src[h * dim + e];
              key_dst[e] = heads > 1 ? sum / static_cast<float>(heads) : sum;
            }
          }
        }
      }
    });
  }
  // an image without a live row: certified (nothing to prune)
  for (int64_t b = 0; b < batch; ++b) {
    bool any = false;
    for (int64_t t = 0; t < n && !any; ++t) any = row_of[b * n + t] >= 0 && live_data[b * n + t] > 0.f;
    if (!any) certified_data[b] = true;
  }
  at::Tensor lengths = at::empty({static_cast<int64_t>(caps.size())}, packed.options());
  std::copy(caps.begin(), caps.end(), lengths.data_ptr<int64_t>());
  return {out, received, certified, key_mean, lengths};
}
