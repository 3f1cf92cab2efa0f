//! The fuzz targets: each checks one input against its oracles (returning a
//! behaviour signature, or what went wrong) and mutates inputs its own way.

pub mod codec;
pub mod codec_plan;
pub mod frames;
pub mod frames_mutate;
pub mod head;
pub mod scrub;

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Codec,
    Frames,
    Head,
    Scrub,
    /// Checks the fuzzer itself (tests/cli.rs): inputs starting with `panic`,
    /// `abort` or `oracle` fail in that way.
    SelfTest,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Codec, Target::Frames, Target::Head, Target::Scrub];

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL
            .into_iter()
            .chain([Target::SelfTest])
            .find(|t| t.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Codec => "codec",
            Target::Frames => "frames",
            Target::Head => "head",
            Target::Scrub => "scrub",
            Target::SelfTest => "selftest",
        }
    }

    /// Runs the oracles: `Ok(signature)` of the behaviour seen, or the failure.
    pub fn check(self, input: &[u8]) -> Result<u64, String> {
        match self {
            Target::Codec => codec::check(input),
            Target::Frames => frames::check(input),
            Target::Head => head::check(input),
            Target::Scrub => scrub::check(input),
            Target::SelfTest => self_test(input),
        }
    }

    pub fn mutate(self, rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        match self {
            Target::Codec => codec_plan::mutate(rng, input, corpus),
            Target::Frames => frames_mutate::mutate(rng, input, corpus),
            Target::Scrub => scrub::mutate(rng, input, corpus),
            Target::Head | Target::SelfTest => head::mutate(rng, input, corpus),
        }
    }
}

fn self_test(input: &[u8]) -> Result<u64, String> {
    if input.starts_with(b"panic") {
        panic!("self-test panic");
    }
    if input.starts_with(b"abort") {
        std::process::abort();
    }
    if input.starts_with(b"oracle") {
        return Err("self-test oracle".into());
    }
    Ok(0)
}
