"""Custom compute kernels, imported as `phanes_kernels`: a plain torch reference beside each accelerated kernel."""
