//! The Argo Rollouts canary strategy, as far as the canary story needs it: the steps, and
//! the replica counts Argo derives from them.
//!
//! The counts follow `CalculateReplicaCountsForTrafficRoutedCanary` in Argo Rollouts'
//! `utils/replicaset/canary.go` (a canary with traffic routing):
//!
//! - **canary** = ⌈W × replicas / 100⌉, W being the current `setWeight` (the seed's
//!   `setCanaryScale: {matchTrafficWeight: true}`; a `setCanaryScale` weight apart from the
//!   traffic is not modelled);
//! - **stable**, without `dynamicStableScale`: `spec.replicas`, the whole time;
//! - **stable**, with `dynamicStableScale: true`: the larger of ⌈(100 − W) × replicas / 100⌉
//!   and ⌈S × replicas / 100⌉, S being the stable weight Argo *last wrote* to the traffic
//!   router. Argo does not wait for the AWS Load Balancer Controller to apply it (unless
//!   weight verification is on), which is the seed's failure: the stable set shrinks as soon
//!   as the new weight is written, while the ALB applies it a lag later.
//!
//! Not modelled: `maxSurge`/`maxUnavailable` (ignored with traffic routing),
//! `minPodsPerReplicaSet`, aborts, analysis, weight and target-group verification.

use std::fmt;

/// One canary step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `setCanaryScale: {matchTrafficWeight: true}`: the canary scaled by `setWeight`.
    /// (`setCanaryScale: {weight: W}`, a scale apart from the weight, is not modelled: the
    /// seed does not use it.)
    MatchTrafficWeight,
    /// `setWeight: W`: W % of the traffic to the canary's target group.
    SetWeight(u32),
    /// `pause: {duration: …}`, the scenario's pause.
    Pause,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::MatchTrafficWeight => f.write_str("setCanaryScale matchTrafficWeight"),
            Step::SetWeight(w) => write!(f, "setWeight {w}"),
            Step::Pause => f.write_str("pause"),
        }
    }
}

/// The seed's steps, as `k8s/examples/checkout-rollout.yaml` has them:
/// `setCanaryScale: {matchTrafficWeight: true}`, then setWeight 10/60/80/90/100 with a
/// pause after each. The first step scales the canary to its traffic weight, 0: the real
/// controller (Argo Rollouts v1.10.1 in `tests/node.rs`) deletes the canary pod it had
/// started for the new revision, and `setWeight: 10` brings one back; no canary pod is
/// warm before it gets traffic.
pub fn seed_steps() -> Vec<Step> {
    use Step::*;
    vec![
        MatchTrafficWeight,
        SetWeight(10),
        Pause,
        SetWeight(60),
        Pause,
        SetWeight(80),
        Pause,
        SetWeight(90),
        Pause,
        SetWeight(100),
        Pause,
    ]
}

/// What Argo's replica counts depend on, as the steps have set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The current `setWeight`.
    pub set_weight: u32,
    /// The stable weight Argo last wrote to the traffic router (100 − canary weight).
    pub written_stable_weight: u32,
}

impl Default for Status {
    fn default() -> Status {
        Status {
            set_weight: 0,
            written_stable_weight: 100,
        }
    }
}

/// ⌈weight × replicas / 100⌉ (Argo's `trafficWeightToReplicas`).
pub fn weight_to_replicas(replicas: u32, weight: u32) -> u32 {
    (weight * replicas).div_ceil(100)
}

/// The (canary, stable) replica counts Argo wants now.
pub fn desired_counts(replicas: u32, dynamic_stable_scale: bool, s: &Status) -> (u32, u32) {
    let weight = s.set_weight;
    let canary = weight_to_replicas(replicas, weight);
    if !dynamic_stable_scale {
        return (canary, replicas);
    }
    let stable = weight_to_replicas(replicas, 100 - weight)
        .max(weight_to_replicas(replicas, s.written_stable_weight));
    (canary, stable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the seed's steps the way the controller does: after each setWeight, counts
    /// before and after the weight is written.
    fn walk(dynamic: bool) -> Vec<(u32, u32)> {
        let mut s = Status::default();
        let mut out = Vec::new();
        for step in seed_steps() {
            match step {
                Step::MatchTrafficWeight => {}
                Step::SetWeight(w) => {
                    s.set_weight = w;
                    out.push(desired_counts(5, dynamic, &s));
                    s.written_stable_weight = 100 - w;
                }
                Step::Pause => continue,
            }
            out.push(desired_counts(5, dynamic, &s));
        }
        out
    }

    #[test]
    fn dynamic_stable_scale_shrinks_stable_once_the_weight_is_written() {
        assert_eq!(
            walk(true),
            [
                (0, 5), // matchTrafficWeight at weight 0: no canary pod
                (1, 5), // setWeight 10, before the weight is written: one canary pod
                (1, 5), // after: ⌈90 % of 5⌉ = 5
                (3, 5), // setWeight 60, before the weight is written
                (3, 2), // after: stable shrinks at once
                (4, 2),
                (4, 1),
                (5, 1),
                (5, 1),
                (5, 1),
                (5, 0),
            ]
        );
    }

    #[test]
    fn without_it_the_stable_set_stays_whole() {
        assert!(walk(false).iter().all(|&(_, stable)| stable == 5));
        assert_eq!(walk(false).last(), Some(&(5, 5)));
        assert_eq!(weight_to_replicas(5, 10), 1);
        assert_eq!(weight_to_replicas(5, 0), 0);
    }
}
