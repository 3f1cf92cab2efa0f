//! The checked-in inputs pass their targets' oracles (seed corpus and the inputs
//! of past findings, in fuzz/regressions/<target>/), and a short deterministic
//! run of each target finds nothing. In a debug build, so overflow checks are on.

use std::path::Path;
use std::time::Duration;

use chatbox_fuzz::runner::{self, Outcome, Run};
use chatbox_fuzz::targets::Target;

fn dir(kind: &str, target: Target) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target.name())
}

#[test]
fn seeds_and_past_findings_pass() {
    for target in Target::ALL {
        let seeds = runner::load_corpus(&dir("corpus", target)).expect("corpus readable");
        assert!(seeds.len() >= 5, "{} has a seed corpus", target.name());
        let past = runner::load_corpus(&dir("regressions", target)).expect("readable");
        for input in seeds.iter().chain(&past) {
            if let Err(why) = runner::exec(target, input) {
                panic!("{}: {why}\ninput: {}", target.name(), hex(input));
            }
        }
    }
}

#[test]
fn a_short_run_of_each_target_finds_nothing() {
    for target in Target::ALL {
        let run = Run {
            target,
            time: Duration::from_secs(600),
            seed: 12,
            corpus_dir: dir("corpus", target),
            execs_max: Some(300),
        };
        let mut recorded = 0;
        match runner::fuzz(&run, &mut |_| recorded += 1).expect("runs") {
            Outcome::Clean { execs, .. } => assert_eq!(execs, 300),
            Outcome::Found(f) => panic!("{}: {}\ninput: {}", target.name(), f.why, hex(&f.input)),
        }
        assert!(recorded > 300, "every input is recorded before it runs");
    }
}

#[test]
fn the_recorder_keeps_the_last_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("running");
    let mut r = runner::Recorder::create(&path).expect("mapped");
    r.record(b"a longer first input");
    r.record(b"second");
    assert_eq!(runner::recorded(&path).as_deref(), Some(&b"second"[..]));
}

fn hex(input: &[u8]) -> String {
    input.iter().map(|b| format!("{b:02x}")).collect()
}
