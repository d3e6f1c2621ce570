//! affgate-benches: criterion micro-benchmarks of the hot-path pieces
//! (`benches/*.rs`) and the load harness scripts beside them (`*.sh`).
