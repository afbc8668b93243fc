//! The TLS fast path on the real kernel (work in progress).

use passthrough_tests::require_kernel;
use passthrough_user::kernel::{Capacities, Kernel};

#[test]
fn programs_load() {
    if !require_kernel() {
        return;
    }
    let k = Kernel::load(Capacities::default(), 0, 0, Default::default(), None);
    if let Err(e) = &k {
        let s = format!("{e:?}");
        let n = s.len();
        eprintln!(
            "{}\n...\n{}",
            &s[..300.min(n)],
            &s[n.saturating_sub(3000)..]
        );
        std::fs::write("/tmp/verifier.log", s.replace("\\n", "\n")).unwrap();
    }
    k.expect("load");
}
