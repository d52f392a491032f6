//! Arbitrary bytes through the server's pprof path: decode (gzip or raw,
//! bounded), resolve every stack, build a batch. Errors are fine; panics,
//! hangs and unbounded allocation are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler_server::config::Limits;
use profiler_server::ingest::{self, BatchBuilder, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(profile) = profiler_pprof::decode_gzip(data, 1 << 20) else {
        return;
    };
    let _ = profiler_pprof::to_stacks(&profile);
    let limits = Limits { max_series_per_request: 64, ..Limits::default() };
    let target = Target { service: "fuzz".into(), kind: "cpu".into(), ts_ms: 0, labels: Default::default() };
    let Ok(idx) = ingest::pick_sample_type(&profile, None, Some("cpu")) else {
        return;
    };
    let mut b = BatchBuilder::new(&limits, target).expect("valid target");
    if ingest::pprof(&profile, idx, &mut b).is_ok() {
        let batch = b.finish();
        assert!(batch.rows.iter().all(|r| batch.stacks.iter().any(|(id, _)| *id == r.stack_id)));
    }
});
