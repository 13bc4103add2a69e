//! The embedded fatbin and what ptxas said about each kernel when it was built.

use serde::Serialize;

static FATBIN: &[u8] = include_bytes!(env!("HORIZON_FATBIN"));
static REPORT: &str = include_str!(env!("HORIZON_PTXAS_REPORT"));
static BUILD_STATUS: &str = include_str!(env!("HORIZON_KERNEL_BUILD_STATUS"));

pub fn fatbin() -> &'static [u8] {
    FATBIN
}

/// ptxas's `-v` report, verbatim (empty in a build without kernels).
pub fn ptxas_report() -> &'static str {
    REPORT
}

/// "ok: <nvcc>" or "no kernels: <why>".
pub fn kernel_build_status() -> &'static str {
    BUILD_STATUS.trim()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KernelInfo {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_frame_bytes: u32,
    pub shared_bytes: u32,
}

fn first_number_before(line: &str, suffix: &str) -> Option<u32> {
    let idx = line.find(suffix)?;
    line[..idx].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// Parses ptxas's report into one entry per (kernel, arch).
pub fn parse_report(report: &str) -> Vec<KernelInfo> {
    let mut out: Vec<KernelInfo> = Vec::new();
    let mut current: Option<usize> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            out.push(KernelInfo {
                name,
                arch,
                registers: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                stack_frame_bytes: 0,
                shared_bytes: 0,
            });
            current = Some(out.len() - 1);
        } else if line.contains("Compiling") {
            // A non-entry function (or anything else): stop attributing lines to a kernel.
            current = None;
        } else if let Some(i) = current {
            let k = &mut out[i];
            if line.contains("spill stores") {
                k.stack_frame_bytes = first_number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = first_number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = first_number_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                k.registers = first_number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = first_number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// The kernels embedded in this build, one entry per (kernel, arch) that has SASS.
pub fn embedded_kernels() -> Vec<KernelInfo> {
    parse_report(REPORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'acc_bf16_to_f32' for 'sm_80'
ptxas info    : Function properties for acc_bf16_to_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'big' for 'sm_90a'
ptxas info    : Function properties for big
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
";

    #[test]
    fn parses_registers_and_spills() {
        let k = parse_report(SAMPLE);
        assert_eq!(k.len(), 2);
        assert_eq!((k[0].name.as_str(), k[0].arch.as_str(), k[0].registers), ("acc_bf16_to_f32", "sm_80", 18));
        assert_eq!(k[0].spill_store_bytes + k[0].spill_load_bytes, 0);
        assert_eq!((k[1].registers, k[1].spill_store_bytes, k[1].spill_load_bytes), (255, 16, 12));
        assert_eq!((k[1].stack_frame_bytes, k[1].shared_bytes), (24, 4096));
    }

    /// The build-report check: no embedded kernel spills registers on any arch.
    #[test]
    fn no_embedded_kernel_spills() {
        let spilling: Vec<_> = embedded_kernels()
            .into_iter()
            .filter(|k| k.spill_store_bytes > 0 || k.spill_load_bytes > 0)
            .collect();
        assert!(spilling.is_empty(), "kernels spill registers: {spilling:?}");
    }
}
