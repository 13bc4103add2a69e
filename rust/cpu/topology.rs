//! Host topology: NUMA nodes with their CPUs and memory, host RAM, the CPUs this process may
//! use. Read from sysfs and procfs; a machine without NUMA information is one node.

use serde::Serialize;
use std::fs;

#[derive(Debug, Clone, Serialize)]
pub struct NumaNode {
    pub id: u32,
    /// CPUs of the node that this process may run on (the affinity mask applied).
    pub cpus: Vec<usize>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// Parses a kernel cpulist such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    v.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.trim().parse() {
                    v.push(a);
                }
            }
        }
    }
    v
}

/// CPUs this process may run on (`sched_getaffinity`: containers restrict the set).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let l = l.trim();
        // lines are "MemTotal:  123 kB" or, per node, "Node 0 MemTotal:  123 kB"
        let idx = l.find(key)?;
        l[idx + key.len()..].split_whitespace().next()?.parse().ok()
    })
}

pub fn host_memory_bytes() -> (u64, u64) {
    let t = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    (
        meminfo_kib(&t, "MemTotal:").unwrap_or(0) * 1024,
        meminfo_kib(&t, "MemAvailable:").unwrap_or(0) * 1024,
    )
}

/// One node from its sysfs `cpulist` and `meminfo` texts: the CPUs this process may run on,
/// memory in bytes (sysfs reports kB).
fn node_from_sysfs(id: u32, cpulist: &str, meminfo: &str, allowed: &[usize]) -> NumaNode {
    NumaNode {
        id,
        cpus: parse_cpulist(cpulist).into_iter().filter(|c| allowed.contains(c)).collect(),
        memory_total_bytes: meminfo_kib(meminfo, "MemTotal:").unwrap_or(0) * 1024,
        memory_free_bytes: meminfo_kib(meminfo, "MemFree:").unwrap_or(0) * 1024,
    }
}

pub fn numa_nodes() -> Vec<NumaNode> {
    let allowed = allowed_cpus();
    let online = fs::read_to_string("/sys/devices/system/node/online").ok();
    let ids = online.as_deref().map(parse_cpulist).unwrap_or_default();
    let mut nodes: Vec<NumaNode> = ids
        .into_iter()
        .map(|id| {
            let base = format!("/sys/devices/system/node/node{id}");
            let cpulist = fs::read_to_string(format!("{base}/cpulist")).unwrap_or_default();
            let mi = fs::read_to_string(format!("{base}/meminfo")).unwrap_or_default();
            node_from_sysfs(id as u32, &cpulist, &mi, &allowed)
        })
        .collect();
    if nodes.is_empty() {
        let (total, avail) = host_memory_bytes();
        nodes.push(NumaNode { id: 0, cpus: allowed, memory_total_bytes: total, memory_free_bytes: avail });
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulist_ranges() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist(""), Vec::<usize>::new());
    }

    #[test]
    fn a_node_from_its_sysfs_texts() {
        let mi = "Node 1 MemTotal:       65536 kB\nNode 1 MemFree:        1024 kB\nNode 1 MemUsed: 64512 kB\n";
        let n = node_from_sysfs(1, "4-7,12\n", mi, &[0, 1, 2, 3, 4, 5, 6, 12, 13]);
        assert_eq!(n.id, 1);
        assert_eq!(n.cpus, vec![4, 5, 6, 12]); // 7 is not ours to run on
        assert_eq!(n.memory_total_bytes, 65536 * 1024);
        assert_eq!(n.memory_free_bytes, 1024 * 1024);
        let empty = node_from_sysfs(0, "", "", &[0]);
        assert!(empty.cpus.is_empty() && empty.memory_total_bytes == 0 && empty.memory_free_bytes == 0);
    }

    #[test]
    fn host_memory_agrees_with_sysconf() {
        // An independent source: the kernel's page count and page size.
        // SAFETY: plain sysconf queries.
        let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        let phys = pages as f64 * page as f64;
        let (total, avail) = host_memory_bytes();
        assert!((total as f64 - phys).abs() <= 0.01 * phys, "MemTotal {total} vs sysconf {phys}");
        assert!(avail > 0 && avail <= total, "MemAvailable {avail} of {total}");
    }

    #[test]
    fn this_machine_has_a_node_with_cpus_and_memory() {
        let nodes = numa_nodes();
        assert!(!nodes.is_empty());
        assert!(nodes.iter().map(|n| n.cpus.len()).sum::<usize>() >= 1);
        assert!(host_memory_bytes().0 > 0);
    }
}
