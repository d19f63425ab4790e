"""The DIPY family: discrete-sphere peaks, direction getters and DIPY's LocalTracking driver.

  peaks          discrete-sphere peak extraction (DIPY's peak_directions)
  getters        DIPY's direction getters: closest peak and deterministic maximum (hard, soft, straight-through)
  probabilistic  DIPY probabilistic and iFOD1-like sampling getters, Gumbel-softmax, REINFORCE
  tracker        LocalTracking: fixed-step Euler, threshold/binary stopping, bidirectional assembly
"""
