// The token mixer of an MS-MLP block in one pass over an NHWC float32 map on the CPU, and its input and
// kernel gradients in one pass each (training; the bias gradient is the output gradient's sum).
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

// ----- the plan: groups, packed kernels and column tables of one call --------------------------

struct Plan {
  std::vector<Group> groups;
  std::vector<float> taps;         // per group: lr taps, then td taps, each [k * k][size]
  std::vector<int64_t> lr_cols;    // per group and column v: ((v - s) mod W) * C, the lr source column
  std::vector<int64_t> plain_cols; // per column v: v * C
  std::vector<int64_t> moved;      // per group and column w: (w + s) mod W, where the lr roll moved w
  std::vector<int64_t> offsets;    // per group: where its taps start in `taps`
};

// Groups from the kernels' shapes; with `flip`, each kernel rotated by 180 degrees (the adjoint's).
Plan make_plan(int64_t channels, int64_t width, const std::vector<torch::Tensor>& lr_weights,
               const std::vector<torch::Tensor>& td_weights, const std::vector<int64_t>& shifts, bool flip) {
  const int64_t groups = static_cast<int64_t>(shifts.size());
  TORCH_CHECK(lr_weights.size() == shifts.size() && td_weights.size() == shifts.size(),
              "shift_mix: one weight and shift per group and branch");
  Plan plan;
  int64_t taps_total = 0;
  for (const auto& w : lr_weights) taps_total += 2 * w.numel();
  plan.taps.resize(taps_total);
  plan.lr_cols.resize(groups * width);
  plan.moved.resize(groups * width);
  plan.plain_cols.resize(width);
  for (int64_t v = 0; v < width; ++v) plan.plain_cols[v] = v * channels;
  int64_t start = 0, offset = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const auto& lr = lr_weights[g];
    const int64_t size = lr.size(0), k = lr.size(-1);
    TORCH_CHECK(k % 2 == 1 && lr.sizes() == td_weights[g].sizes() && lr.numel() == size * k * k,
                "shift_mix: group ", g, " needs (c, 1, k, k) kernels of odd k in both branches");
    float* branch_taps[2] = {plan.taps.data() + offset, plan.taps.data() + offset + size * k * k};
    const torch::Tensor kernels[2] = {lr.contiguous(), td_weights[g].contiguous()};
    for (int b = 0; b < 2; ++b) {
      TORCH_CHECK(kernels[b].scalar_type() == at::kFloat && kernels[b].device().is_cpu(),
                  "shift_mix: float32 CPU parameters");
      const float* src = kernels[b].data_ptr<float>();
      for (int64_t c = 0; c < size; ++c)
        for (int64_t t = 0; t < k * k; ++t) branch_taps[b][t * size + c] = src[c * k * k + (flip ? k * k - 1 - t : t)];
    }
    for (int64_t w = 0; w < width; ++w) {
      plan.lr_cols[g * width + w] = wrap(w - shifts[g], width) * channels;
      plan.moved[g * width + w] = wrap(w + shifts[g], width);
    }
    plan.groups.push_back({start, size, k, shifts[g], branch_taps[0], branch_taps[1], plan.lr_cols.data() + g * width});
    plan.offsets.push_back(offset);
    offset += 2 * size * k * k;
    start += size;
  }
  TORCH_CHECK(start == channels, "shift_mix: the groups cover ", start, " channels, the map has ", channels);
  return plan;
}

void check_map(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "shift_mix: ", what, " must be a contiguous float32 NHWC map on the CPU");
}

// The channel vectors of a group: every kLanes channels, the last one ending at the group's end
// (overlapping the one before it where the group is not a multiple of kLanes).
template <typename F>
void for_each_vector(const Group& group, F&& body) {
  for (int64_t c = 0; c < group.size; c += kLanes) body(std::min(c, group.size - kLanes), c);
}

// ----- training: the input gradient -----------------------------------------------------------
// Each branch's adjoint is a depthwise conv of the output gradient g with the kernel rotated by 180
// degrees, read around the pixel the roll moved (h, w) to:
//   grad_x[n, h, w, c] = sum_{i, j} k_lr'[c, i, j] * g[n, h + i - p, (w + s) mod W + j - p, c]
//                      + sum_{i, j} k_td'[c, i, j] * g[n, (h + s) mod H + i - p, w + j - p, c]
// with k' the rotated kernel and the taps outside the map skipped.

// acc[w] += sum_{i, j} taps[i, j] * rows[i][(w + j - p) * channels] over the taps inside the map
// (rows[i] null for a kernel row outside it); inside pixels kBlock at a time in registers.
void conv_row_vectors(Vec* acc, const float* const* rows, int64_t width, int64_t channels, int64_t k,
                      const float* taps, int64_t tap_stride) {
  constexpr int kBlock = 4;
  const int64_t p = k / 2;
  const int64_t inner_first = std::min(p, width), inner_stop = std::max(inner_first, width - p);
  for (int64_t i = 0; i < k; ++i) {
    const float* row = rows[i];
    if (row == nullptr) continue;
    const float* row_taps = taps + i * k * tap_stride;
    int64_t w = inner_first;
    for (; w + kBlock <= inner_stop; w += kBlock) {
      Vec sum[kBlock];
      for (int q = 0; q < kBlock; ++q) sum[q] = acc[w + q];
      for (int64_t j = 0; j < k; ++j) {
        const Vec tap = load(row_taps + j * tap_stride);
        const float* src = row + (w + j - p) * channels;
        for (int q = 0; q < kBlock; ++q) sum[q] += tap * load(src + q * channels);
      }
      for (int q = 0; q < kBlock; ++q) acc[w + q] = sum[q];
    }
    const int64_t blocks_stop = w;
    for (int64_t j = 0; j < k; ++j) {
      const Vec tap = load(row_taps + j * tap_stride);
      const int64_t first = std::max<int64_t>(0, p - j), stop = std::min(width, width + p - j);
      const float* src = row + (j - p) * channels;
      for (int64_t v = first; v < std::min(stop, inner_first); ++v) acc[v] += tap * load(src + v * channels);
      for (int64_t v = std::max(first, blocks_stop); v < stop; ++v) acc[v] += tap * load(src + v * channels);
    }
  }
}

// Kernel rows of one branch's adjoint: the rows of g around row `centre` (null outside the map).
void adjoint_rows(const float** rows, const float* image, int64_t centre, int64_t k, int64_t height, int64_t row_stride) {
  const int64_t p = k / 2;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t hh = centre + i - p;
    rows[i] = (hh < 0 || hh >= height) ? nullptr : image + hh * row_stride;
  }
}

void grad_input_row_scalar(const float* image, float* out_row, int64_t height, int64_t width, int64_t channels,
                           int64_t h, const Group& group, const int64_t* moved) {
  const int64_t k = group.kernel, p = k / 2, row_stride = width * channels;
  const int64_t centres[2] = {h, wrap(h + group.shift, height)};
  for (int64_t w = 0; w < width; ++w)
    for (int64_t c = 0; c < group.size; ++c) {
      float sum = 0;
      const int64_t columns[2] = {moved[w], w};
      const float* taps[2] = {group.lr, group.td};
      for (int b = 0; b < 2; ++b)
        for (int64_t i = 0; i < k; ++i) {
          const int64_t hh = centres[b] + i - p;
          if (hh < 0 || hh >= height) continue;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t ww = columns[b] + j - p;
            if (ww < 0 || ww >= width) continue;
            sum += taps[b][(i * k + j) * group.size + c] * image[hh * row_stride + ww * channels + group.start + c];
          }
        }
      out_row[w * channels + group.start + c] = sum;
    }
}


// ----- training: the weight gradients ----------------------------------------------------------
//   grad_k_lr[c, i, j] = sum_{n, h, w} g[n, h, w, c] * x[n, h + i - p, (w + j - p - s) mod W, c]
//   grad_k_td[c, i, j] = sum_{n, h, w} g[n, h, w, c] * x[n, (h + i - p - s) mod H, w + j - p, c]
// over the taps inside the map. Rows of g are split into one chunk per thread, each summing into
// its own buffer; the buffers are added in chunk order, so the result does not depend on timing.

// sums[i, j] += sum_w g_row[w * C] * rows[i][cols[w + j - p]] over the taps inside the map, for a
// vector of channels; per kernel row its K sums stay in registers over the row. Lanes below
// `first_lane` are not added (they belong to the vector before).
template <int K>
void weight_grad_vectors(float* sums, int64_t tap_stride, const float* g_row, const float* const* rows,
                         const int64_t* cols, int64_t width, int64_t channels, int first_lane) {
  constexpr int64_t p = K / 2;
  const int64_t inner_first = std::min(p, width), inner_stop = std::max(inner_first, width - p);
  for (int i = 0; i < K; ++i) {
    const float* row = rows[i];
    if (row == nullptr) continue;
    Vec sum[K];
    for (int j = 0; j < K; ++j) sum[j] = Vec{};
    for (int64_t w = inner_first; w < inner_stop; ++w) {
      const Vec gv = load(g_row + w * channels);
      const int64_t* src = cols + w - p;
      for (int j = 0; j < K; ++j) sum[j] += gv * load(row + src[j]);
    }
    auto border = [&](int64_t from, int64_t to) {
      for (int64_t w = from; w < to; ++w) {
        const Vec gv = load(g_row + w * channels);
        for (int j = 0; j < K; ++j) {
          const int64_t v = w + j - p;
          if (v >= 0 && v < width) sum[j] += gv * load(row + cols[v]);
        }
      }
    };
    border(0, inner_first);
    border(inner_stop, width);
    for (int j = 0; j < K; ++j) {
      float* out = sums + (i * K + j) * tap_stride;
      if (first_lane == 0) {
        store(out, load(out) + sum[j]);
      } else {
        for (int lane = first_lane; lane < kLanes; ++lane) out[lane] += sum[j][lane];
      }
    }
  }
}

// The same for any kernel size, one channel at a time (sums: [k * k][size]).
void weight_grad_scalar(float* sums, int64_t size, const float* g_row, const float* const* rows,
                        const int64_t* cols, int64_t width, int64_t channels, int64_t k) {
  const int64_t p = k / 2;
  for (int64_t i = 0; i < k; ++i) {
    if (rows[i] == nullptr) continue;
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < size; ++c) {
        float sum = 0;
        for (int64_t w = std::max<int64_t>(0, p - j); w < std::min(width, width + p - j); ++w)
          sum += g_row[w * channels + c] * rows[i][cols[w + j - p] + c];
        sums[(i * k + j) * size + c] += sum;
      }
  }
}

// One branch of one group for one row of g: `rows` its kernel rows of x at the group's first channel;
// `at_c` scratch for as many row pointers.
void weight_grad_branch(float* sums, const Group& group, const float* g_row, const float* const* rows,
                        const int64_t* cols, int64_t width, int64_t channels, std::vector<const float*>& at_c) {
  const int64_t k = group.kernel, size = group.size;
  const bool vectors = size >= kLanes && (k == 1 || k == 3 || k == 5 || k == 7);
  if (!vectors) {
    weight_grad_scalar(sums, size, g_row, rows, cols, width, channels, k);
    return;
  }
  at_c.resize(k);
  for_each_vector(group, [&](int64_t c, int64_t unshifted) {
    for (int64_t i = 0; i < k; ++i) at_c[i] = rows[i] ? rows[i] + c : nullptr;
    const int first_lane = static_cast<int>(unshifted - c);  // > 0 for an overlapping last vector
    float* at = sums + c;
    const float* g = g_row + c;
    switch (k) {
      case 1: weight_grad_vectors<1>(at, size, g, at_c.data(), cols, width, channels, first_lane); break;
      case 3: weight_grad_vectors<3>(at, size, g, at_c.data(), cols, width, channels, first_lane); break;
      case 5: weight_grad_vectors<5>(at, size, g, at_c.data(), cols, width, channels, first_lane); break;
      default: weight_grad_vectors<7>(at, size, g, at_c.data(), cols, width, channels, first_lane); break;
    }
  });
}

}  // namespace

torch::Tensor shift_mix(const torch::Tensor& x, const std::vector<torch::Tensor>& lr_weights,
                        const std::vector<torch::Tensor>& lr_biases, const std::vector<torch::Tensor>& td_weights,
                        const std::vector<torch::Tensor>& td_biases, const std::vector<int64_t>& shifts) {
  check_map(x, "x");
  TORCH_CHECK(lr_biases.size() == shifts.size() && td_biases.size() == shifts.size(),
              "shift_mix: one bias per group and branch");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const Plan plan = make_plan(channels, width, lr_weights, td_weights, shifts, false);
  std::vector<float> bias(channels);  // the branches' biases summed
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    const Group& group = plan.groups[g];
    const auto lr_bias = lr_biases[g].contiguous(), td_bias = td_biases[g].contiguous();
    TORCH_CHECK(lr_bias.scalar_type() == at::kFloat && td_bias.scalar_type() == at::kFloat &&
                    lr_bias.numel() == group.size && td_bias.numel() == group.size,
                "shift_mix: group ", g, " needs float32 biases of ", group.size, " channels");
    for (int64_t c = 0; c < group.size; ++c)
      bias[group.start + c] = lr_bias.data_ptr<float>()[c] + td_bias.data_ptr<float>()[c];
  }

  auto out = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* result = out.data_ptr<float>();
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> acc(width);
    for (int64_t row = begin; row < end; ++row) {
      const float* image = in + (row / height) * height * width * channels;
      float* out_row = result + row * width * channels;
      for (const Group& group : plan.groups) {
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

torch::Tensor shift_mix_grad_input(const torch::Tensor& grad, const std::vector<torch::Tensor>& lr_weights,
                                   const std::vector<torch::Tensor>& td_weights, const std::vector<int64_t>& shifts) {
  check_map(grad, "grad");
  const int64_t batch = grad.size(0), height = grad.size(1), width = grad.size(2), channels = grad.size(3);
  const Plan plan = make_plan(channels, width, lr_weights, td_weights, shifts, true);
  auto out = torch::empty_like(grad);
  const float* in = grad.data_ptr<float>();
  float* result = out.data_ptr<float>();
  const int64_t row_stride = width * channels;
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> lr(width), td(width);
    std::vector<const float*> rows, at_c;
    for (int64_t row = begin; row < end; ++row) {
      const float* image = in + (row / height) * height * row_stride;
      float* out_row = result + row * row_stride;
      const int64_t h = row % height;
      for (size_t g = 0; g < plan.groups.size(); ++g) {
        const Group& group = plan.groups[g];
        const int64_t* moved = plan.moved.data() + g * width;
        if (group.size < kLanes) {
          grad_input_row_scalar(image, out_row, height, width, channels, h, group, moved);
          continue;
        }
        rows.resize(2 * group.kernel);
        at_c.resize(2 * group.kernel);
        adjoint_rows(rows.data(), image + group.start, h, group.kernel, height, row_stride);
        adjoint_rows(rows.data() + group.kernel, image + group.start, wrap(h + group.shift, height), group.kernel,
                     height, row_stride);
        for_each_vector(group, [&](int64_t c, int64_t) {
          for (size_t i = 0; i < rows.size(); ++i) at_c[i] = rows[i] ? rows[i] + c : nullptr;
          std::fill(lr.begin(), lr.end(), Vec{});
          std::fill(td.begin(), td.end(), Vec{});
          conv_row_vectors(lr.data(), at_c.data(), width, channels, group.kernel, group.lr + c, group.size);
          conv_row_vectors(td.data(), at_c.data() + group.kernel, width, channels, group.kernel, group.td + c,
                           group.size);
          for (int64_t w = 0; w < width; ++w)
            store(out_row + w * channels + group.start + c, lr[moved[w]] + td[w]);
        });
      }
    }
  });
  return out;
}

std::vector<torch::Tensor> shift_mix_grad_weight(const torch::Tensor& grad, const torch::Tensor& x,
                                                 const std::vector<torch::Tensor>& lr_weights,
                                                 const std::vector<torch::Tensor>& td_weights,
                                                 const std::vector<int64_t>& shifts) {
  check_map(grad, "grad");
  check_map(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "shift_mix: grad and x differ in shape");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const Plan plan = make_plan(channels, width, lr_weights, td_weights, shifts, false);
  const int64_t total = static_cast<int64_t>(plan.taps.size()), rows_total = batch * height;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows_total));
  std::vector<float> partial(chunks * total, 0.f);
  const float* xs = x.data_ptr<float>();
  const float* gs = grad.data_ptr<float>();
  const int64_t row_stride = width * channels;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows, at_c;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* sums = partial.data() + chunk * total;
      for (int64_t row = chunk * rows_total / chunks; row < (chunk + 1) * rows_total / chunks; ++row) {
        const float* image = xs + (row / height) * height * row_stride;
        const int64_t h = row % height;
        for (size_t g = 0; g < plan.groups.size(); ++g) {
          const Group& group = plan.groups[g];
          const int64_t k = group.kernel, p = k / 2;
          const float* g_row = gs + row * row_stride + group.start;
          rows.resize(2 * k);
          for (int64_t i = 0; i < k; ++i) {
            const int64_t hh = h + i - p;
            const bool inside = hh >= 0 && hh < height;
            rows[i] = inside ? image + hh * row_stride + group.start : nullptr;
            rows[k + i] = inside ? image + wrap(hh - group.shift, height) * row_stride + group.start : nullptr;
          }
          float* lr_sums = sums + plan.offsets[g];
          weight_grad_branch(lr_sums, group, g_row, rows.data(), group.lr_cols, width, channels, at_c);
          weight_grad_branch(lr_sums + group.size * k * k, group, g_row, rows.data() + k, plan.plain_cols.data(),
                             width, channels, at_c);
        }
      }
    }
  });
  std::vector<torch::Tensor> grads;  // per group: lr, then td, each (size, 1, k, k)
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    const Group& group = plan.groups[g];
    const int64_t taps = group.kernel * group.kernel;
    for (int b = 0; b < 2; ++b) {
      auto out = torch::empty({group.size, 1, group.kernel, group.kernel}, x.options());
      float* dst = out.data_ptr<float>();
      const int64_t base = plan.offsets[g] + b * group.size * taps;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < group.size; ++c) {
          float sum = 0;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * total + base + t * group.size + c];
          dst[c * taps + t] = sum;
        }
      grads.push_back(out);
    }
  }
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shift_mix", &shift_mix, "The MS-MLP token mixer of an NHWC float32 map");
  m.def("shift_mix_grad_input", &shift_mix_grad_input, "The mixer's input gradient (NHWC float32)");
  m.def("shift_mix_grad_weight", &shift_mix_grad_weight, "The mixer's kernel gradients, per group lr then td");
}
