//! Arbitrary bytes through the folded parser; every row of an accepted
//! body must reference an interned stack.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler_server::config::Limits;
use profiler_server::ingest::{self, BatchBuilder, Target};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let target = Target { service: "fuzz".into(), kind: "cpu".into(), ts_ms: 0, labels: Default::default() };
    let mut b = BatchBuilder::new(&limits, target).expect("valid target");
    if ingest::folded(data, 7, &mut b).is_ok() {
        let batch = b.finish();
        for r in &batch.rows {
            assert!(batch.stacks.iter().any(|(id, _)| *id == r.stack_id));
        }
    }
});
