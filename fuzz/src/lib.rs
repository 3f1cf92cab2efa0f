//! A small coverage-free mutational fuzzer for chatbox that runs on the stable
//! toolchain (cargo-fuzz needs nightly): targets for the WebSocket codec, the
//! client frame parser, the HTTP request-head reader and the image scrubber that
//! removes location metadata from uploads, each with oracles beyond
//! "does not panic". `fuzz --help` and README's "Fuzzing" say how to run it.

pub mod mutate;
pub mod rng;
pub mod runner;
pub mod targets;
pub mod ws;
