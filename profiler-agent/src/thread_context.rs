//! OpenTelemetry's thread context (OTEP 4947), read like custom labels (see `labels`):
//! an SDK that opts in publishes, per thread, a pointer `otel_thread_ctx_v1` (an ELF
//! thread-local it exports) to a record of the request the thread serves: trace id,
//! span id, a valid byte, trace flags and attributes whose keys are indexes into a map
//! the process publishes once, in its process context (OTEP 4719: a memory mapping
//! named `OTEL_CTX` holding an OTLP `Resource`).
//!
//! This module reads the process context and decodes the kernel's records; `labels`
//! finds the thread-local and tells the kernel, as for custom labels, and treats the
//! decoded context as a label set: the trace and span ids are high-cardinality keys
//! (the trace names the request), the attributes labels.

use profiler_common::{ThreadContextRecord, THREAD_CONTEXT_ATTR_BYTES, THREAD_CONTEXT_HEADER_BYTES, THREAD_CONTEXT_RECORD_HEADER_BYTES};
use profiler_pprof::otlp::ProcessContext;

/// The thread-local an SDK publishes its threads' records through.
pub const SYMBOL: &str = "otel_thread_ctx_v1";

/// `threadlocal.schema_version` values whose records this reader decodes (the OTEP's
/// development name, and the one it takes once merged).
const SCHEMAS: [&str; 2] = ["tlsdesc_v1_dev", "tls_v1"];

/// Bytes of a process context's header: signature, version, payload size, publication
/// time, payload address.
const HEADER_BYTES: usize = 32;
/// Payloads larger than this are not read (a resource is "expected to be in the KB
/// range").
const MAX_PAYLOAD: usize = 64 << 10;

/// Why a process's thread context cannot be read (yet).
#[derive(Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// No process context, or it publishes no thread context: nothing to read.
    Absent,
    /// A schema this reader does not decode (a Go or Node.js one, or a later version).
    Schema(String),
    /// Being written, or changed while it was read: look again later.
    Busy,
}

/// The process context of `pid`, if it publishes a thread context this reader decodes.
pub fn process_context(pid: u32) -> Result<ProcessContext, Unreadable> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|_| Unreadable::Absent)?;
    // A memfd (`/memfd:OTEL_CTX (deleted)`), or an anonymous mapping named by prctl.
    let start = maps
        .lines()
        .find(|line| line.contains("/memfd:OTEL_CTX") || line.contains("[anon_shmem:OTEL_CTX]") || line.contains("[anon:OTEL_CTX]"))
        .and_then(|line| u64::from_str_radix(line.split('-').next()?, 16).ok())
        .ok_or(Unreadable::Absent)?;
    let header = |pid| {
        let mut bytes = [0u8; HEADER_BYTES];
        crate::process::read_memory(pid, start, &mut bytes).then_some(bytes)
    };
    let first = header(pid).ok_or(Unreadable::Absent)?;
    let word = |bytes: &[u8; HEADER_BYTES], at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
    let version = u32::from_ne_bytes(first[8..12].try_into().unwrap());
    if &first[..8] != b"OTEL_CTX" || !(1..=2).contains(&version) {
        return Err(Unreadable::Absent);
    }
    let size = u32::from_ne_bytes(first[12..16].try_into().unwrap()) as usize;
    let (published, payload_at) = (word(&first, 16), word(&first, 24));
    if published == 0 {
        return Err(Unreadable::Busy);
    }
    if size > MAX_PAYLOAD {
        return Err(Unreadable::Absent);
    }
    let mut payload = vec![0u8; size];
    if !crate::process::read_memory(pid, payload_at, &mut payload) {
        return Err(Unreadable::Busy);
    }
    // Unchanged publication time: the payload read is the one the header described.
    if header(pid).is_none_or(|again| word(&again, 16) != published) {
        return Err(Unreadable::Busy);
    }
    let context = profiler_pprof::otlp::process_context(&payload).map_err(|_| Unreadable::Absent)?;
    match context.thread_schema.as_deref() {
        None => Err(Unreadable::Absent),
        Some(schema) if SCHEMAS.contains(&schema) => Ok(context),
        Some(schema) => Err(Unreadable::Schema(schema.to_owned())),
    }
}

/// A thread's context as the kernel sent it.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub tid: u32,
    pub tgid: u32,
    pub ts_ns: u64,
    /// Lower-case hex, None when all zero (no trace active).
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// (key index, value), the last of each index, in index order.
    pub attributes: Vec<(u8, String)>,
}

/// Decodes a record of the kernel's; None if malformed.
pub fn decode(bytes: &[u8]) -> Option<Decoded> {
    let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let tid = u32_at(std::mem::offset_of!(ThreadContextRecord, tid))?;
    let tgid = u32_at(std::mem::offset_of!(ThreadContextRecord, tgid))?;
    let at = std::mem::offset_of!(ThreadContextRecord, ts_ns);
    let ts_ns = u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
    let attrs_len = (u32_at(std::mem::offset_of!(ThreadContextRecord, attrs_len))? as usize).min(THREAD_CONTEXT_ATTR_BYTES);
    let at = std::mem::offset_of!(ThreadContextRecord, header);
    let header = bytes.get(at..at + THREAD_CONTEXT_HEADER_BYTES)?;
    let attrs = bytes.get(THREAD_CONTEXT_RECORD_HEADER_BYTES..THREAD_CONTEXT_RECORD_HEADER_BYTES + attrs_len)?;
    let id = |raw: &[u8]| raw.iter().any(|&b| b != 0).then(|| raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
    Some(Decoded { tid, tgid, ts_ns, trace_id: id(&header[..16]), span_id: id(&header[16..24]), attributes: attributes(attrs) })
}

/// `attrs-data`: entries of key index (1 byte), length (1 byte) and that many bytes of
/// UTF-8, packed; parsing stops at an entry the buffer cannot hold whole (a record cut
/// at [`THREAD_CONTEXT_ATTR_BYTES`]); of a key given twice, the last one counts.
fn attributes(mut data: &[u8]) -> Vec<(u8, String)> {
    let mut out: Vec<(u8, String)> = Vec::new();
    while let [key, len, rest @ ..] = data {
        let Some(value) = rest.get(..*len as usize) else { break };
        let value: String = String::from_utf8_lossy(value).chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => out.push((*key, value)),
        }
        data = &rest[*len as usize..];
    }
    out.sort_by_key(|(key, _)| *key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_take_the_last_of_a_key_and_stop_at_a_cut_entry() {
        let data = [0, 3, b'a', b'b', b'c', 1, 1, b'x', 0, 2, b'd', b'e', 2, 5, b'c', b'u'];
        assert_eq!(attributes(&data), [(0, "de".to_owned()), (1, "x".to_owned())]);
        assert_eq!(attributes(&[]), []);
        assert_eq!(attributes(&[7]), []);
    }

    #[test]
    fn records_decode_ids_as_hex_and_zero_ids_as_none() {
        let mut record = vec![0u8; THREAD_CONTEXT_RECORD_HEADER_BYTES + 4];
        let put = |record: &mut Vec<u8>, at: usize, bytes: &[u8]| record[at..at + bytes.len()].copy_from_slice(bytes);
        put(&mut record, std::mem::offset_of!(ThreadContextRecord, tid), &7u32.to_ne_bytes());
        put(&mut record, std::mem::offset_of!(ThreadContextRecord, tgid), &5u32.to_ne_bytes());
        put(&mut record, std::mem::offset_of!(ThreadContextRecord, ts_ns), &99u64.to_ne_bytes());
        put(&mut record, std::mem::offset_of!(ThreadContextRecord, attrs_len), &4u32.to_ne_bytes());
        let header = std::mem::offset_of!(ThreadContextRecord, header);
        put(&mut record, header, &[0xab; 16]);
        put(&mut record, THREAD_CONTEXT_RECORD_HEADER_BYTES, &[3, 2, b'/', b'a']);
        let decoded = decode(&record).unwrap();
        assert_eq!((decoded.tid, decoded.tgid, decoded.ts_ns), (7, 5, 99));
        assert_eq!(decoded.trace_id.as_deref(), Some("abababababababababababababababab"));
        assert_eq!(decoded.span_id, None);
        assert_eq!(decoded.attributes, [(3, "/a".to_owned())]);
        assert_eq!(decode(&record[..20]), None);
    }
}
