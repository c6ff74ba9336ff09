// The token mixer of an MS-MLP block in one pass over an NHWC map, for inference on the CPU.
//
// out[n, h, w, c] = bias_lr[c] + bias_td[c]
//                 + sum_{i, j} k_lr[c, i, j] * x[n, h + i - p, (w + j - p - s) mod W, c]   (lr: roll along W)
//                 + sum_{i, j} k_td[c, i, j] * x[n, (h + i - p - s) mod H, w + j - p, c]   (td: roll along H)
// with s, k x k (p = k / 2) the shift and kernel of c's group, and the taps that fall outside the map
// skipped (the released convs' zero padding, applied after the roll). Each group runs at its own
// kernel size: no zero taps, no rolled copies, one read of x, one write of out.
//
// Built on first use by msmlp/cpu_kernel.py with -O3 -march=native -fopenmp (torch's OpenMP runtime,
// so at::parallel_for uses torch's intra-op threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;  // channels per vector
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline int64_t wrap(int64_t v, int64_t n) {
  v %= n;
  return v < 0 ? v + n : v;
}

struct Group {
  int64_t start, size, kernel, shift;
  const float* lr;  // kernel taps, tap-major: [kernel * kernel][size]
  const float* td;
  const int64_t* lr_cols;  // per output column w + j - p in [0, W): the lr source column's offset, times C
};

// Both branches' taps of kernel row `i` for output pixels [first, stop) of a row, every tap inside
// the map, kBlock pixels at a time with their sums in registers; returns where the whole blocks end.
template <int kBlock>
inline int64_t interior_taps(Vec* acc, int64_t first, int64_t stop, int64_t k, int64_t p, int64_t channels,
                             const float* lr_row, const float* td_row, const int64_t* lr_cols, const float* lr_taps,
                             const float* td_taps, int64_t tap_stride) {
  int64_t w = first;
  for (; w + kBlock <= stop; w += kBlock) {
    Vec sum[kBlock];
    for (int q = 0; q < kBlock; ++q) sum[q] = acc[w + q];
    for (int64_t j = 0; j < k; ++j) {
      const Vec lr_tap = load(lr_taps + j * tap_stride), td_tap = load(td_taps + j * tap_stride);
      const int64_t* cols = lr_cols + w + j - p;
      const float* td_src = td_row + (w + j - p) * channels;
      for (int q = 0; q < kBlock; ++q)
        sum[q] += lr_tap * load(lr_row + cols[q]) + td_tap * load(td_src + q * channels);
    }
    for (int q = 0; q < kBlock; ++q) acc[w + q] = sum[q];
  }
  return w;
}

// Sum of both branches for channels [c, c + kLanes) of `group` along one output row. Pixels whose
// taps all fall inside the map accumulate every tap of a kernel row in registers, a few pixels at a
// time; the others (the border, and what is left of the inside) tap by tap, over the range each tap
// stays inside the map.
void mix_row_vectors(const float* image, float* out_row, int64_t height, int64_t width, int64_t channels, int64_t h,
                     const Group& group, int64_t c, const float* bias, std::vector<Vec>& acc) {
  const int64_t k = group.kernel, p = k / 2;
  const Vec b = load(bias + group.start + c);
  std::fill(acc.begin(), acc.end(), b);
  const int64_t inner_first = std::min(p, width), inner_stop = std::max(inner_first, width - p);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t hh = h + i - p;
    if (hh < 0 || hh >= height) continue;
    const float* lr_row = image + hh * width * channels + group.start + c;
    const float* td_row = image + wrap(hh - group.shift, height) * width * channels + group.start + c;
    const float* lr_taps = group.lr + i * k * group.size + c;
    const float* td_taps = group.td + i * k * group.size + c;
    const int64_t blocks_stop = interior_taps<4>(acc.data(), inner_first, inner_stop, k, p, channels, lr_row,
                                                 td_row, group.lr_cols, lr_taps, td_taps, group.size);
    for (int64_t j = 0; j < k; ++j) {
      const Vec lr_tap = load(lr_taps + j * group.size), td_tap = load(td_taps + j * group.size);
      const int64_t first = std::max<int64_t>(0, p - j), stop = std::min(width, width + p - j);
      const int64_t* lr_cols = group.lr_cols + (j - p);
      const float* td_src = td_row + (j - p) * channels;
      auto taps_over = [&](int64_t from, int64_t to) {
        for (int64_t w = from; w < to; ++w)
          acc[w] += lr_tap * load(lr_row + lr_cols[w]) + td_tap * load(td_src + w * channels);
      };
      taps_over(first, std::min(stop, inner_first));
      taps_over(std::max(first, blocks_stop), stop);
    }
  }
  for (int64_t w = 0; w < width; ++w) store(out_row + w * channels + group.start + c, acc[w]);
}

// Groups narrower than a vector, one value at a time.
void mix_row_scalar(const float* image, float* out_row, int64_t height, int64_t width, int64_t channels, int64_t h,
                    const Group& group, const float* bias) {
  const int64_t k = group.kernel, p = k / 2;
  for (int64_t w = 0; w < width; ++w)
    for (int64_t c = 0; c < group.size; ++c) {
      float sum = bias[group.start + c];
      for (int64_t i = 0; i < k; ++i) {
        const int64_t hh = h + i - p;
        if (hh < 0 || hh >= height) continue;
        const float* lr_row = image + hh * width * channels + group.start + c;
        const float* td_row = image + wrap(hh - group.shift, height) * width * channels + group.start + c;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t ww = w + j - p;
          if (ww < 0 || ww >= width) continue;
          sum += group.lr[(i * k + j) * group.size + c] * lr_row[group.lr_cols[ww]] +
                 group.td[(i * k + j) * group.size + c] * td_row[ww * channels];
        }
      }
      out_row[w * channels + group.start + c] = sum;
    }
}

}  // namespace

torch::Tensor shift_mix(const torch::Tensor& x, const std::vector<torch::Tensor>& lr_weights,
                        const std::vector<torch::Tensor>& lr_biases, const std::vector<torch::Tensor>& td_weights,
                        const std::vector<torch::Tensor>& td_biases, const std::vector<int64_t>& shifts) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "shift_mix: x must be a contiguous float32 NHWC map on the CPU");
  const int64_t groups = static_cast<int64_t>(shifts.size());
  TORCH_CHECK(lr_weights.size() == shifts.size() && lr_biases.size() == shifts.size() &&
                  td_weights.size() == shifts.size() && td_biases.size() == shifts.size(),
              "shift_mix: one weight, bias and shift per group and branch");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);

  // Kernels tap-major (a vector of channels per tap), branch biases summed, lr source columns.
  int64_t taps_total = 0;
  for (const auto& w : lr_weights) taps_total += 2 * w.numel();
  std::vector<float> taps(taps_total), bias(channels);
  std::vector<int64_t> lr_cols(groups * width);
  std::vector<Group> plan(groups);
  int64_t start = 0;
  float* packed = taps.data();
  for (int64_t g = 0; g < groups; ++g) {
    const auto& lr = lr_weights[g];
    const int64_t size = lr.size(0), k = lr.size(-1);
    TORCH_CHECK(k % 2 == 1 && lr.sizes() == td_weights[g].sizes() && lr.numel() == size * k * k &&
                    lr_biases[g].numel() == size && td_biases[g].numel() == size,
                "shift_mix: group ", g, " needs (c, 1, k, k) kernels of odd k and c biases in both branches");
    float* branch_taps[2] = {packed, packed + size * k * k};
    const torch::Tensor kernels[2] = {lr.contiguous(), td_weights[g].contiguous()};
    for (int b = 0; b < 2; ++b) {
      TORCH_CHECK(kernels[b].scalar_type() == at::kFloat && kernels[b].device().is_cpu(),
                  "shift_mix: float32 CPU parameters");
      const float* src = kernels[b].data_ptr<float>();
      for (int64_t c = 0; c < size; ++c)
        for (int64_t t = 0; t < k * k; ++t) branch_taps[b][t * size + c] = src[c * k * k + t];
    }
    const auto lr_bias = lr_biases[g].contiguous(), td_bias = td_biases[g].contiguous();
    TORCH_CHECK(lr_bias.scalar_type() == at::kFloat && td_bias.scalar_type() == at::kFloat,
                "shift_mix: float32 CPU parameters");
    for (int64_t c = 0; c < size; ++c)
      bias[start + c] = lr_bias.data_ptr<float>()[c] + td_bias.data_ptr<float>()[c];
    for (int64_t w = 0; w < width; ++w) lr_cols[g * width + w] = wrap(w - shifts[g], width) * channels;
    plan[g] = {start, size, k, shifts[g], branch_taps[0], branch_taps[1], lr_cols.data() + g * width};
    packed += 2 * size * k * k;
    start += size;
  }
  TORCH_CHECK(start == channels, "shift_mix: the groups cover ", start, " channels, x has ", channels);

  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* result = out.data_ptr<float>();
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> acc(width);
    for (int64_t row = begin; row < end; ++row) {
      const float* image = in + (row / height) * height * width * channels;
      float* out_row = result + row * width * channels;
      for (const Group& group : plan) {
        if (group.size < kLanes) {
          mix_row_scalar(image, out_row, height, width, channels, row % height, group, bias.data());
          continue;
        }
        // vectors of kLanes channels; the last one ends at the group's end (overlapping, same values)
        for (int64_t c = 0; c < group.size; c += kLanes)
          mix_row_vectors(image, out_row, height, width, channels, row % height, group,
                          std::min(c, group.size - kLanes), bias.data(), acc);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shift_mix", &shift_mix, "The MS-MLP token mixer of an NHWC float32 map (inference)");
}
