//! `fuzz`: runs one target for a bounded time. The process started from the
//! command line supervises a worker (itself with `--worker`): a finding the worker
//! catches (a panic, a broken oracle) it reports itself; if the worker dies
//! outright or hangs, the supervisor reports the input it was running.
//! Exit codes: 0 nothing found, 1 a finding (saved under --findings and printed
//! as hex), 2 a usage or I/O error.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatbox_fuzz::rng::hash;
use chatbox_fuzz::runner::{self, Outcome, Recorder, Run};
use chatbox_fuzz::targets::Target;

const USAGE: &str = "\
usage: fuzz --target codec|frames|head|scrub [--secs N] [--seed S] [--corpus DIR]
            [--findings DIR] [--save-corpus DIR] [--execs N]
       fuzz --target T --repro FILE...

  --secs N         fuzz for N seconds (default 60)
  --seed S         generator seed (default: from the clock; printed at the start)
  --corpus DIR     seed inputs (default fuzz/corpus/<target>)
  --findings DIR   where findings are written (default fuzz/findings)
  --save-corpus DIR  write the inputs that showed new behaviour there
  --execs N        stop after N mutants
  --repro FILE...  run these inputs once each and report";

/// A worker still running this long after its time is hung.
const GRACE: Duration = Duration::from_secs(10);
/// The worker fuzzes on a thread with this stack, as small as a core thread's
/// (2 MiB, the default for spawned threads) or smaller, so deep recursion shows.
const WORKER_STACK_BYTES: usize = 1024 * 1024;

struct Args {
    target: Target,
    secs: u64,
    seed: u64,
    corpus: PathBuf,
    findings: PathBuf,
    save_corpus: Option<PathBuf>,
    execs: Option<u64>,
    repro: Vec<PathBuf>,
    /// Set in the worker: where to mirror the input being run.
    record: Option<PathBuf>,
}

fn parse_args(raw: &[String]) -> Result<Args, String> {
    let mut target = None;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut a = Args {
        target: Target::Codec,
        secs: 60,
        seed,
        corpus: PathBuf::new(),
        findings: PathBuf::from("fuzz/findings"),
        save_corpus: None,
        execs: None,
        repro: Vec::new(),
        record: None,
    };
    let mut it = raw.iter();
    let num = |v: Option<&String>| -> Result<u64, String> {
        v.ok_or("missing value")?
            .parse()
            .map_err(|e| format!("{e}"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--target" => {
                let name = it.next().ok_or("--target needs a name")?;
                target = Some(Target::from_name(name).ok_or(format!("unknown target {name}"))?);
            }
            "--secs" => a.secs = num(it.next())?,
            "--seed" => a.seed = num(it.next())?,
            "--execs" => a.execs = Some(num(it.next())?),
            "--corpus" => a.corpus = it.next().ok_or("--corpus needs a directory")?.into(),
            "--findings" => a.findings = it.next().ok_or("--findings needs a directory")?.into(),
            "--save-corpus" => {
                a.save_corpus = Some(it.next().ok_or("--save-corpus needs a directory")?.into())
            }
            "--record" => a.record = Some(it.next().ok_or("--record needs a file")?.into()),
            "--repro" => a.repro.extend(it.by_ref().map(PathBuf::from)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.target = target.ok_or("--target is required")?;
    if a.corpus.as_os_str().is_empty() {
        a.corpus = Path::new("fuzz/corpus").join(a.target.name());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuzz: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !args.repro.is_empty() {
        return repro(&args);
    }
    if args.record.is_some() {
        let worker = std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || worker(&args));
        return worker
            .ok()
            .and_then(|w| w.join().ok())
            .unwrap_or(ExitCode::from(2));
    }
    supervise(&args, &raw)
}

fn repro(args: &Args) -> ExitCode {
    let mut failed = false;
    for path in &args.repro {
        let input = match std::fs::read(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        match runner::exec(args.target, &input) {
            Ok(_) => println!("ok   {}", path.display()),
            Err(why) => {
                failed = true;
                println!("FAIL {}: {why}", path.display());
            }
        }
    }
    ExitCode::from(u8::from(failed))
}

fn worker(args: &Args) -> ExitCode {
    let mut recorder = match args.record.as_deref().map(Recorder::create) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            eprintln!("fuzz: cannot map the input record: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    let run = Run {
        target: args.target,
        time: Duration::from_secs(args.secs),
        seed: args.seed,
        corpus_dir: args.corpus.clone(),
        execs_max: args.execs,
    };
    let started = Instant::now();
    let outcome = runner::fuzz(&run, &mut |input| {
        if let Some(r) = recorder.as_mut() {
            r.record(input)
        }
    });
    match outcome {
        Err(e) => {
            eprintln!("fuzz: {}: {e}", args.corpus.display());
            ExitCode::from(2)
        }
        Ok(Outcome::Found(f)) => {
            report(args, "crash", &f.input, &f.why);
            ExitCode::from(1)
        }
        Ok(Outcome::Clean { execs, added }) => {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "fuzz {}: {execs} inputs in {secs:.1} s ({:.0}/s), {} new behaviours, nothing found",
                args.target.name(),
                execs as f64 / secs.max(0.001),
                added.len()
            );
            if let Some(dir) = &args.save_corpus {
                save_all(dir, &added);
            }
            ExitCode::SUCCESS
        }
    }
}

fn save_all(dir: &Path, inputs: &[Vec<u8>]) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("fuzz: {}: {e}", dir.display());
        return;
    }
    for input in inputs {
        let path = dir.join(format!("{:016x}.bin", hash(input)));
        if let Err(e) = std::fs::write(&path, input) {
            eprintln!("fuzz: {}: {e}", path.display());
        }
    }
}

/// Runs the worker and watches it: a death or hang is reported with the input
/// it was running.
fn supervise(args: &Args, raw: &[String]) -> ExitCode {
    println!(
        "fuzz {}: {} s, seed {}, corpus {}",
        args.target.name(),
        args.secs,
        args.seed,
        args.corpus.display()
    );
    if let Err(e) = std::fs::create_dir_all(&args.findings) {
        eprintln!("fuzz: {}: {e}", args.findings.display());
        return ExitCode::from(2);
    }
    let record = args.findings.join(format!(
        ".running-{}-{}",
        args.target.name(),
        std::process::id()
    ));
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fuzz"));
    let mut child = match Command::new(exe)
        .args(raw)
        .args(["--seed", &args.seed.to_string(), "--record"])
        .arg(&record)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fuzz: cannot start the worker: {e}");
            return ExitCode::from(2);
        }
    };
    let limit = Duration::from_secs(args.secs) + GRACE;
    let started = Instant::now();
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.code() == Some(0) => break ExitCode::SUCCESS,
            Ok(Some(status)) if status.code() == Some(1) => break ExitCode::from(1),
            Ok(Some(status)) => break died(args, &record, &format!("the worker died: {status}")),
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break died(args, &record, "the worker hung");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break died(args, &record, &format!("cannot wait for the worker: {e}")),
        }
    };
    let _ = std::fs::remove_file(&record);
    code
}

fn died(args: &Args, record: &Path, why: &str) -> ExitCode {
    match runner::recorded(record) {
        Some(input) => report(args, "died", &input, why),
        None => eprintln!("fuzz {}: {why}; the input is lost", args.target.name()),
    }
    ExitCode::from(1)
}

/// Saves a finding and prints it as hex.
fn report(args: &Args, kind: &str, input: &[u8], why: &str) {
    let name = format!("{}-{kind}-{:016x}", args.target.name(), hash(input));
    let path = args.findings.join(format!("{name}.bin"));
    let _ = std::fs::create_dir_all(&args.findings);
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("fuzz: {}: {e}", path.display());
    }
    let _ = std::fs::write(
        args.findings.join(format!("{name}.txt")),
        format!("{why}\n"),
    );
    eprintln!(
        "FINDING in target {} (seed {}): {why}",
        args.target.name(),
        args.seed
    );
    eprintln!("input, {} bytes, saved as {}:", input.len(), path.display());
    const SHOWN: usize = 16 * 1024;
    for line in input[..input.len().min(SHOWN)].chunks(64) {
        let hex: String = line.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("  {hex}");
    }
    if input.len() > SHOWN {
        eprintln!("  ... ({} more bytes in the file)", input.len() - SHOWN);
    }
    eprintln!(
        "reproduce: fuzz --target {} --repro {}",
        args.target.name(),
        path.display()
    );
}
