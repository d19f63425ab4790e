"""SD_Stream (MRtrix3 ``tckgen -algorithm SD_Stream``): drivers composed from :mod:`tractfunc.core`.

  tracking   the step, the fixed-shape functional tracker, the eager tracker and the front door
  pipelined  per-streamline Newton scheduling for the eager tracker (bit-identical, faster)
  follow     recompute given streamlines along fixed discrete decisions (float64, gradients of tckgen's)
  jacobian   per-streamline Jacobians of vertices wrt seeds / initial directions
  native     the C kernel with tckgen's exact float32 arithmetic (csrc/sd_stream.c)
"""
