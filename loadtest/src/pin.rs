//! CPU pinning for `compare`, so a comparison is honest: each server with ALL its
//! threads (storage and pool threads included) on the first `--server-cores` CPUs
//! this process may use, and the load-generating client on the rest. The server's
//! mask is set in the child between fork and exec (every thread it ever starts
//! inherits it), the client's on every thread of this process; both are then read
//! back from /proc/PID/task/*/status, so a mask that did not take fails the run.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::Value;

/// Which CPUs each side runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub server: Vec<usize>,
    pub client: Vec<usize>,
}

/// Splits the CPUs this process may use (`allowed`, any order) into the server's
/// (the lowest `server_cores`) and the client's (all the others). Err says why
/// there is no honest split: the client needs at least one CPU of its own.
pub fn plan(allowed: &[usize], server_cores: usize) -> Result<Plan, String> {
    let mut cpus = allowed.to_vec();
    cpus.sort_unstable();
    cpus.dedup();
    if server_cores == 0 || cpus.len() <= server_cores {
        return Err(format!(
            "{} CPU(s) available ({}) and {server_cores} for the server leave none for the client",
            cpus.len(),
            format_list(&cpus)
        ));
    }
    let client = cpus.split_off(server_cores);
    Ok(Plan {
        server: cpus,
        client,
    })
}

/// `0-2,5` for [0, 1, 2, 5] (the kernel's list format).
pub fn format_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Parses the kernel's list format (`Cpus_allowed_list: 0-2,5`).
pub fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > libc::CPU_SETSIZE as usize {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// The CPUs of a JSON array (as recorded in a summary).
pub fn cpus_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_u64().map(|c| c as usize))
        .collect()
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: c is below CPU_SETSIZE, the set's size in bits.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// The CPUs this process may run on (its affinity mask, which also reflects a
/// cgroup's cpuset or an outer `taskset`).
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: zeroed is a valid empty set; the kernel writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: pid 0 is the calling thread; `set` is a valid, writable cpu_set_t.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = libc::CPU_SETSIZE as usize;
    // SAFETY: every index is below CPU_SETSIZE.
    Ok((0..n)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes; tid 0 is the caller.
    if unsafe { libc::sched_setaffinity(tid, size, set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child started by `cmd` (and every thread it starts) run on `cpus`.
pub fn pin_command(cmd: &mut Command, cpus: &[usize]) {
    let set = cpu_set(cpus);
    // SAFETY: the closure runs between fork and exec and only makes one system
    // call (sched_setaffinity is async-signal-safe); `set` was built before fork.
    unsafe {
        cmd.pre_exec(move || set_affinity(0, &set));
    }
}

fn thread_ids(pid: &str) -> std::io::Result<Vec<libc::pid_t>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Puts every thread of this process on `cpus` (threads started later inherit it
/// from the thread that starts them). Twice, in case a thread started meanwhile.
pub fn pin_self(cpus: &[usize]) -> anyhow::Result<()> {
    let set = cpu_set(cpus);
    for _ in 0..2 {
        for tid in thread_ids("self")? {
            match set_affinity(tid, &set) {
                Ok(()) => {}
                // A thread that ended between the listing and the call.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e).context(format!("pinning thread {tid} of loadtest")),
            }
        }
    }
    Ok(())
}

/// Every thread of `pid` ("self" for this process) with its allowed CPUs, read
/// from /proc/PID/task/TID/status.
pub fn thread_affinities(pid: &str) -> anyhow::Result<Vec<(libc::pid_t, Vec<usize>)>> {
    let mut out = Vec::new();
    for tid in thread_ids(pid).with_context(|| format!("listing /proc/{pid}/task"))? {
        // A thread may end between the listing and the read: skip it.
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue;
        };
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .and_then(parse_list)
            .with_context(|| format!("no Cpus_allowed_list in /proc/{pid}/task/{tid}/status"))?;
        out.push((tid, list));
    }
    Ok(out)
}

/// Checks that every thread of `pid` runs on exactly `cpus`; returns how many
/// threads were checked. Fails loudly, naming the threads, when a mask did not take.
pub fn verify(pid: &str, cpus: &[usize]) -> anyhow::Result<usize> {
    let threads = thread_affinities(pid)?;
    let wrong: Vec<String> = threads
        .iter()
        .filter(|(_, c)| c.as_slice() != cpus)
        .map(|(tid, c)| format!("thread {tid} on CPUs {}", format_list(c)))
        .collect();
    if threads.is_empty() || !wrong.is_empty() {
        bail!(
            "pinning did not take for process {pid}: expected every thread on CPUs {}, found {} \
             (of {} threads); rerun with --no-pin to compare unpinned",
            format_list(cpus),
            if wrong.is_empty() {
                "no threads".into()
            } else {
                wrong.join(", ")
            },
            threads.len()
        );
    }
    Ok(threads.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_gets_the_lowest_cpus_and_the_client_the_rest() {
        let p = plan(&[0, 1], 1).unwrap();
        assert_eq!((p.server, p.client), (vec![0], vec![1]));
        let p = plan(&[3, 0, 2, 1, 7], 2).unwrap();
        assert_eq!((p.server, p.client), (vec![0, 1], vec![2, 3, 7]));
        // An outer taskset or cpuset: only the CPUs this process may use count.
        let p = plan(&[2, 5], 1).unwrap();
        assert_eq!((p.server, p.client), (vec![2], vec![5]));
    }

    #[test]
    fn no_cpu_left_for_the_client_means_no_pinning() {
        let e = plan(&[0, 1], 2).unwrap_err();
        assert!(e.contains("leave none for the client"), "{e}");
        assert!(e.contains("(0-1)"), "{e}");
        assert!(plan(&[0], 1).is_err());
        assert!(plan(&[0, 1, 2], 4).is_err());
        assert!(plan(&[0, 1], 0).is_err());
    }

    #[test]
    fn lists_round_trip_in_the_kernels_format() {
        assert_eq!(format_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_list(&[]), "");
        assert_eq!(parse_list("0-2,5,7-8\n"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_list(" 1"), Some(vec![1]));
        assert_eq!(parse_list("2-1"), None);
        assert_eq!(parse_list("x"), None);
    }

    /// A child pinned through `pin_command` has the mask on every thread, and
    /// `verify` sees it (and refuses a mask it does not have).
    #[test]
    fn a_pinned_child_runs_on_its_cpus_only() {
        let allowed = allowed_cpus().unwrap();
        let one = [allowed[0]];
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        pin_command(&mut cmd, &one);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().to_string();
        let checked = verify(&pid, &one);
        let wrong = verify(&pid, &[allowed[0] + 1]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(checked.unwrap(), 1);
        let e = wrong.unwrap_err().to_string();
        assert!(e.contains("pinning did not take"), "{e}");
    }
}
