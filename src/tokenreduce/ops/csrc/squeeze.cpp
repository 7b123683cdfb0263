// Fused CPU kernel: TPS's squeeze (inference form) in one call.
//
// The rule of tokenreduce/ops/squeeze.py (`squeeze_state` without restoration): every dropped patch
// token picks as host the kept token of highest cosine / T (first maximum), and every host becomes
// (e·x_host + Σ w·x_guest) / (e + Σ w), w = exp(cos / T); sizes add up. At batch 1 on CPU the ~60
// small ATen ops of the Python path, not the arithmetic, are most of a squeeze's cost.
// Operation order follows the Python path: guests are accumulated from zero in their order, then
// added to e·x_host, then divided; cos / T divides by T as a float32; no FMA contraction. The row norms and exp are this file's own, so results agree with the Python
// path to float rounding (the tests compare to 1e-6), not always bit for bit.
//
// Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in module.cpp.

#include "kernels.h"
#include "rows.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// e¹, the host's own weight in its squeeze (tokenreduce.ops.squeeze.SELF_WEIGHT), as a float32 scalar.
constexpr float kSelfWeight = 2.718281828459045f;

}  // namespace

// x: B×N×C float32; size: B×N×1 float32 or None (all ones); keep: B×K int64 and drop: B×M int64 patch
// positions (counted after the first p tokens, disjoint); p: prefix tokens; temperature: T > 0.
// Returns (B×(p+K)×C squeezed x, B×(p+K)×1 sizes): the prefix unchanged, then the kept tokens in `keep`
// order, each merged with the dropped tokens that chose it.
std::vector<at::Tensor> squeeze_tokens(const at::Tensor& x_in, const c10::optional<at::Tensor>& size_in,
                                       const at::Tensor& keep_in, const at::Tensor& drop_in, int64_t p,
                                       double temperature) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "squeeze_tokens: x must be a B×N×C float32 CPU tensor");
  TORCH_CHECK(keep_in.dim() == 2 && drop_in.dim() == 2 && keep_in.scalar_type() == at::kLong &&
                  drop_in.scalar_type() == at::kLong,
              "squeeze_tokens: keep and drop must be B×K and B×M int64 tensors");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor drop = drop_in.contiguous();
  const int64_t batch = x.size(0), n = x.size(1), channels = x.size(2);
  const int64_t k_count = keep.size(1), m_count = drop.size(1);
  TORCH_CHECK(keep.size(0) == batch && drop.size(0) == batch, "squeeze_tokens: keep and drop need x's batch");
  TORCH_CHECK(p >= 0 && k_count >= 1 && p + k_count + m_count <= n, "squeeze_tokens: bad token counts");
  TORCH_CHECK(temperature > 0.0, "squeeze_tokens: the temperature must be > 0");
  at::Tensor size;
  const bool has_size = size_in.has_value() && size_in->defined();
  if (has_size) {
    size = size_in->contiguous();
    TORCH_CHECK(size.scalar_type() == at::kFloat && size.numel() == batch * n,
                "squeeze_tokens: size must be a B×N×1 float32 tensor");
  }
  const int64_t patches = n - p;
  const int64_t* keep_data = keep.data_ptr<int64_t>();
  const int64_t* drop_data = drop.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * k_count; ++i)
    TORCH_CHECK(keep_data[i] >= 0 && keep_data[i] < patches, "squeeze_tokens: keep position out of range");
  for (int64_t i = 0; i < batch * m_count; ++i)
    TORCH_CHECK(drop_data[i] >= 0 && drop_data[i] < patches, "squeeze_tokens: drop position out of range");
  const float* x_data = x.data_ptr<float>();
  const float* size_data = has_size ? size.data_ptr<float>() : nullptr;

  // Unit rows of the dropped (guests) and kept (hosts) tokens, then one BMM: B×M×K cosines.
  at::Tensor guests = at::empty({batch, m_count, channels}, x.options());
  at::Tensor hosts = at::empty({batch, k_count, channels}, x.options());
  float* guest_data = guests.data_ptr<float>();
  float* host_data = hosts.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin; img < end; ++img) {
      const float* patch_x = x_data + (img * n + p) * channels;
      for (int64_t m = 0; m < m_count; ++m)
        tokenreduce::normalise(patch_x + drop_data[img * m_count + m] * channels, channels,
                               guest_data + (img * m_count + m) * channels);
      for (int64_t k = 0; k < k_count; ++k)
        tokenreduce::normalise(patch_x + keep_data[img * k_count + k] * channels, channels,
                               host_data + (img * k_count + k) * channels);
    }
  });
  const at::Tensor cosines = at::bmm(guests, hosts.transpose(1, 2)).contiguous();
  const float* cos_data = cosines.data_ptr<float>();
  const float t = static_cast<float>(temperature);

  const int64_t n_out = p + k_count;
  at::Tensor out = at::empty({batch, n_out, channels}, x.options());
  at::Tensor out_size = at::empty({batch, n_out, 1}, x.options());
  float* out_data = out.data_ptr<float>();
  float* out_size_data = out_size.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(k_count), acc(k_count * channels), weight_sum(k_count), guest_size(k_count);
    for (int64_t img = begin; img < end; ++img) {
      const float* img_x = x_data + img * n * channels;
      const float* img_size = has_size ? size_data + img * n : nullptr;
      float* img_out = out_data + img * n_out * channels;
      float* img_out_size = out_size_data + img * n_out;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(weight_sum.begin(), weight_sum.end(), 0.f);
      std::fill(guest_size.begin(), guest_size.end(), 0.f);
      for (int64_t m = 0; m < m_count; ++m) {
        const float* row = cos_data + (img * m_count + m) * k_count;
        for (int64_t k = 0; k < k_count; ++k) scaled[k] = row[k] / t;
        const int64_t host = tokenreduce::first_argmax(scaled.data(), k_count);
        const float w = std::exp(scaled[host]);
        const int64_t pos = p + drop_data[img * m_count + m];
        const float* src = img_x + pos * channels;
        float* dst = acc.data() + host * channels;
        for (int64_t c = 0; c < channels; ++c) dst[c] += w * src[c];
        weight_sum[host] += w;
        guest_size[host] += img_size != nullptr ? img_size[pos] : 1.f;
      }
      for (int64_t i = 0; i < p; ++i) {
        std::copy(img_x + i * channels, img_x + (i + 1) * channels, img_out + i * channels);
        img_out_size[i] = img_size != nullptr ? img_size[i] : 1.f;
      }
      for (int64_t k = 0; k < k_count; ++k) {
        const int64_t pos = p + keep_data[img * k_count + k];
        const float* src = img_x + pos * channels;
        const float* guests_sum = acc.data() + k * channels;
        const float denominator = kSelfWeight + weight_sum[k];
        float* dst = img_out + (p + k) * channels;
        for (int64_t c = 0; c < channels; ++c) dst[c] = (kSelfWeight * src[c] + guests_sum[c]) / denominator;
        img_out_size[p + k] = (img_size != nullptr ? img_size[pos] : 1.f) + guest_size[k];
      }
    }
  });
  return {out, out_size};
}
