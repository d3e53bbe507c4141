//! The criterion configuration shared by the benches (`mod bench_config;`): short runs, because
//! the whole suite must stay within a few minutes on a 2-core machine and the point is to make
//! regressions visible, not to publish numbers.

use std::time::Duration;

use criterion::Criterion;

/// 10 samples (criterion's minimum), 0.5 s warm-up, then `measurement` of measuring. The slower
/// groups switch to `SamplingMode::Flat` themselves (every sample the same number of
/// iterations, where linear sampling would run 55).
pub fn quick(measurement: Duration) -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(measurement)
        .without_plots()
        // The bench machines are shared and noisy: call a change a regression only above 5 %.
        .noise_threshold(0.05)
}
