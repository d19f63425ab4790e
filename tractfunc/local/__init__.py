"""The DIPY family: discrete-sphere peaks, direction getters and DIPY's LocalTracking driver.

  peaks          DIPY-style peak extraction on a discrete sphere
  getters        closest-peak and deterministic-maximum getters (hard, soft, straight-through)
  probabilistic  DIPY probabilistic and iFOD1-like sampling getters, Gumbel-softmax, REINFORCE
  tracker        LocalTracking: fixed-step Euler, threshold/binary stopping, bidirectional assembly
"""
