// Columns of discrete_step's coefficient row; the same layout as the DS_* constants
// of fastdiff/ops/reference.py, which document each entry.
#pragma once

namespace fastdiff {
namespace discrete {

enum Column : int {
  POSTERIOR = 0,
  CUM_SAME = 1,
  CUM_OTHER = 2,
  CUM_MASK = 3,
  PREV_A = 4,
  PREV_B = 5,
  PREV_C = 6,
  STEP_SAME = 7,
  STEP_OTHER = 8,
  STEP_MASK = 9,
  STEP_UNMASK = 10,
  NUM_COEFFS = 11,
};

constexpr float kClampMin = -70.0f;   // the pipeline's clamp(-70) after truncation
constexpr float kGumbelEps = 1e-30f;  // diffusers' gumbel_noised: -log(-log(u + eps) + eps)

}  // namespace discrete
}  // namespace fastdiff
