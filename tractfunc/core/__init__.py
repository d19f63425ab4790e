"""The primitives: pure tensor functions that every tracker composes, and the specification the fast paths
are tested against.

  arrays       the DLPack/NumPy boundary (zero-copy inputs)
  tracing      whether a call runs under a torch.func transform or torch.compile
  shsize       SH coefficient counts
  sh           real SH basis (MRtrix3 convention), pole-safe derivatives, tckgen's Legendre table
  shbasis      conversions between MRtrix3/tournier07 and descoteaux07 SH bases (legacy and not)
  frames       MRtrix3's realigned voxel frame and its scanner -> voxel transform (Eigen's arithmetic)
  interpolate  trilinear sampling with MRtrix3's image-edge and zero-voxel rules
  fodgrad      compact backward of FOD sampling (one gradient buffer per tracking call)
  field        FOD and mask containers
  params       tracking parameters, tckgen defaults from the voxel size
  newton       the FOD peak by Newton iteration on the sphere (SD_Stream's get_peak, optional exact polish)
  implicit     derivative of the peak by the implicit function theorem (no backprop through Newton)
  integrate    Euler / RK4 steps composed from SD_Stream's elementary move
  stop         stopping rules and reason codes
  seeds        seed points and start directions with an explicit generator
  sphere       the Fibonacci sphere (near-uniform unit vectors)

The core imports only the core and :mod:`tractfunc.errors`.
"""
