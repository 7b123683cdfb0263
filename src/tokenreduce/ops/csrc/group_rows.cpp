// Fused CPU kernels: ToMe for SD's merge of the stream into group means, and its unmerge into the stream.
//
// The rules of tokenreduce/ops/unmerge.py (`TokenGroups.merge` and `TokenGroups.unmerge_add`) with the same
// arithmetic in the same order, so the results equal the PyTorch path's bit for bit:
//   merge:   out[m] = x[rep[m]], then out[into[k]] += x[src[k]] for k = 0, 1, ... (index_add's order), then
//            out[m] / size[m];
//   unmerge: out[t] = x[t] + y[slot[t]].
// The PyTorch path is 5-7 small ATen ops per merge and 3-4 per unmerge; at batch 1 on a CPU their fixed
// costs exceed the work, and at large batches the kernels skip the B×M×C and B×N×C temporaries.
//
// Built on first use by tokenreduce/ops/cpu_kernels.py (torch.utils.cpp_extension.load); bound in module.cpp.

#include "kernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>

namespace {

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.device().is_cpu() && t.scalar_type() == at::kFloat,
              what, " must be a B×N×C float32 CPU tensor");
}

void check_index(const at::Tensor& index, int64_t batch, const char* what) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == batch && index.scalar_type() == at::kLong,
              what, " must be a B×K int64 tensor");
}

}  // namespace

// x: B×N×C float32 stream; rep: B×M, src: B×R, into: B×R int64 (TokenGroups' maps); size: B×M×1 float32.
// Returns the B×M×C group means.
at::Tensor group_mean(const at::Tensor& x_in, const at::Tensor& rep_in, const at::Tensor& src_in,
                      const at::Tensor& into_in, const at::Tensor& size_in) {
  check_rows(x_in, "group_mean: x");
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), n = x.size(1), dim = x.size(2);
  const at::Tensor rep = rep_in.contiguous(), src = src_in.contiguous(), into = into_in.contiguous();
  const at::Tensor size = size_in.contiguous();
  check_index(rep, batch, "group_mean: rep");
  check_index(src, batch, "group_mean: src");
  check_index(into, batch, "group_mean: into");
  const int64_t groups = rep.size(1), merged = src.size(1);
  TORCH_CHECK(into.size(1) == merged, "group_mean: src and into must have the same shape");
  TORCH_CHECK(size.scalar_type() == at::kFloat && size.numel() == batch * groups,
              "group_mean: size must be a B×M×1 float32 tensor");
  at::Tensor out = at::empty({batch, groups, dim}, x.options());
  const float* x_data = x.data_ptr<float>();
  const float* size_data = size.data_ptr<float>();
  const int64_t* rep_data = rep.data_ptr<int64_t>();
  const int64_t* src_data = src.data_ptr<int64_t>();
  const int64_t* into_data = into.data_ptr<int64_t>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin; img < end; ++img) {
      const float* img_x = x_data + img * n * dim;
      float* img_out = out_data + img * groups * dim;
      for (int64_t m = 0; m < groups; ++m) {
        const int64_t t = rep_data[img * groups + m];
        TORCH_CHECK(t >= 0 && t < n, "group_mean: rep out of range");
        std::memcpy(img_out + m * dim, img_x + t * dim, dim * sizeof(float));
      }
      for (int64_t k = 0; k < merged; ++k) {
        const int64_t t = src_data[img * merged + k], g = into_data[img * merged + k];
        TORCH_CHECK(t >= 0 && t < n && g >= 0 && g < groups, "group_mean: src or into out of range");
        const float* row = img_x + t * dim;
        float* acc = img_out + g * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += row[d];
      }
      if (merged == 0) continue;  // the PyTorch path returns the gathered rows undivided (all sizes are 1)
      for (int64_t m = 0; m < groups; ++m) {
        const float s = size_data[img * groups + m];
        float* acc = img_out + m * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] / s;
      }
    }
  });
  return out;
}

// x: B×N×C float32 stream; y: B×M×C float32 group rows; slot: B×N int64 group of every stream token.
// Returns x + y[slot] (B×N×C).
at::Tensor unmerge_add(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& slot_in) {
  check_rows(x_in, "unmerge_add: x");
  check_rows(y_in, "unmerge_add: y");
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), slot = slot_in.contiguous();
  const int64_t batch = x.size(0), n = x.size(1), dim = x.size(2), groups = y.size(1);
  TORCH_CHECK(y.size(0) == batch && y.size(2) == dim, "unmerge_add: x and y must be B×N×C and B×M×C");
  check_index(slot, batch, "unmerge_add: slot");
  TORCH_CHECK(slot.size(1) == n, "unmerge_add: slot must be B×N");
  at::Tensor out = at::empty_like(x);
  const float* x_data = x.data_ptr<float>();
  const float* y_data = y.data_ptr<float>();
  const int64_t* slot_data = slot.data_ptr<int64_t>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / n, g = slot_data[row];
      TORCH_CHECK(g >= 0 && g < groups, "unmerge_add: slot out of range");
      const float* a = x_data + row * dim;
      const float* b = y_data + (img * groups + g) * dim;
      float* o = out_data + row * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = a[d] + b[d];
    }
  });
  return out;
}
