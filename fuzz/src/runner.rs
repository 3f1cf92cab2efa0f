//! The fuzzing loop: seeds first (each must pass), then mutants of corpus entries
//! until the time is up. Without coverage, an input joins the in-memory corpus
//! when it shows a behaviour not seen before (its target's signature: which
//! messages, which error). Panics are caught and reported as findings; the input
//! being run is mirrored into a shared memory map so that a supervisor can report
//! it when the process dies outright (stack overflow, abort).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::mutate::INPUT_BYTES_MAX;
use crate::rng::Rng;
use crate::targets::Target;

/// Corpus entries kept in memory at most.
const CORPUS_MAX: usize = 20_000;

pub struct Run {
    pub target: Target,
    pub time: Duration,
    pub seed: u64,
    pub corpus_dir: PathBuf,
    /// Stop after this many mutants (tests), else when the time is up.
    pub execs_max: Option<u64>,
}

pub enum Outcome {
    Clean { execs: u64, added: Vec<Vec<u8>> },
    Found(Finding),
}

#[derive(Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    pub why: String,
}

/// The files of a corpus directory, by name (dot files skipped); none if absent.
pub fn load_corpus(dir: &Path) -> io::Result<Vec<Vec<u8>>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths.iter().map(fs::read).collect()
}

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs one input through its target's oracles; a panic is a failure too.
pub fn exec(target: Target, input: &[u8]) -> Result<u64, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        panic::set_hook(Box::new(|info| {
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = Some(info.to_string());
            }
        }))
    });
    match panic::catch_unwind(AssertUnwindSafe(|| target.check(input))) {
        Ok(r) => r,
        Err(_) => {
            let msg = LAST_PANIC.lock().ok().and_then(|mut l| l.take());
            Err(format!("panic: {}", msg.unwrap_or_default()))
        }
    }
}

/// Fuzzes until the time (or the number of execs) is up or something is found.
/// `record` sees every input just before it runs.
pub fn fuzz(run: &Run, record: &mut dyn FnMut(&[u8])) -> io::Result<Outcome> {
    let mut corpus = load_corpus(&run.corpus_dir)?;
    let seeds = corpus.len();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut seen = HashSet::new();
    for input in &corpus {
        record(input);
        match exec(run.target, input) {
            Ok(sig) => seen.insert(sig),
            Err(why) => return Ok(found(input, why)),
        };
    }
    let deadline = Instant::now() + run.time;
    let mut rng = Rng::new(run.seed);
    let mut execs = 0u64;
    loop {
        if execs % 32 == 0 && Instant::now() >= deadline {
            break;
        }
        if run.execs_max.is_some_and(|max| execs >= max) {
            break;
        }
        let mut input = corpus[rng.below(corpus.len())].clone();
        run.target.mutate(&mut rng, &mut input, &corpus);
        input.truncate(INPUT_BYTES_MAX);
        record(&input);
        execs += 1;
        match exec(run.target, &input) {
            Ok(sig) => {
                if seen.insert(sig) && corpus.len() < CORPUS_MAX {
                    corpus.push(input);
                }
            }
            Err(why) => return Ok(found(&input, why)),
        }
    }
    let added = corpus.split_off(seeds.max(1));
    Ok(Outcome::Clean { execs, added })
}

fn found(input: &[u8], why: String) -> Outcome {
    Outcome::Found(Finding {
        input: input.to_vec(),
        why,
    })
}

/// The input being run, in a file mapped shared: it survives the process dying,
/// and writing it costs a copy, not a system call.
pub struct Recorder {
    map: *mut u8,
    cap: usize,
}

impl Recorder {
    pub fn create(path: &Path) -> io::Result<Recorder> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let cap = 8 + INPUT_BYTES_MAX;
        file.set_len(cap as u64)?;
        // SAFETY: a fresh shared mapping of a file of `cap` bytes; it stays valid
        // after `file` is closed, until `munmap` in `drop`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Recorder {
            map: map.cast(),
            cap,
        })
    }

    /// Stores the input: its length (little-endian u64), then its bytes.
    pub fn record(&mut self, input: &[u8]) {
        let n = input.len().min(self.cap - 8);
        // SAFETY: the mapping is `cap` bytes long and only this process writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(input.as_ptr(), self.map.add(8), n);
            std::ptr::copy_nonoverlapping((n as u64).to_le_bytes().as_ptr(), self.map, 8);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `create`.
        unsafe { libc::munmap(self.map.cast(), self.cap) };
    }
}

/// The input a [`Recorder`] stored last.
pub fn recorded(path: &Path) -> Option<Vec<u8>> {
    let bytes = fs::read(path).ok()?;
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    bytes.get(8..8 + len).map(<[u8]>::to_vec)
}
