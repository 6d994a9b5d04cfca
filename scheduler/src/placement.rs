//! Placement: which pending runs a worker with free slots receives. Pure functions, no I/O.
//!
//! Policy, in order:
//! 1. a run in retry backoff (`not_before_ms > now_ms`) is not eligible;
//! 2. a fleet never holds more than `max_parallelism` leases at once;
//! 3. fleets share slots round-robin, and the rotation continues across requests: a request
//!    starts with the first fleet after the one that received the previous request's last slot
//!    (`start_after`, kept in the replicated state). So workers asking for one slot at a time
//!    are served fleet 1, 2, 3, 1, 2, 3..., and a large old fleet cannot starve a newer one (the
//!    fair share that Nomad and Hatchet users ask for);
//! 4. within a fleet, runs go in submission order.

/// A fleet as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSlots<'a> {
    /// The fleet's number (its order of submission).
    pub fleet_number: u64,
    /// Leases the fleet may still take: `max_parallelism - running`, saturating at 0.
    pub available: u32,
    /// Pending runs as `(run_index, not_before_ms)`, in run order.
    pub pending: &'a [(u32, u64)],
}

/// One placement decision: lease run `run_index` of fleet `fleet_number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    /// The fleet's number.
    pub fleet_number: u64,
    /// The run's index within its fleet.
    pub run_index: u32,
}

/// Chooses at most `free_slots` runs for one worker at time `now_ms`.
///
/// `fleets` must be ordered by `fleet_number` (oldest first). The rotation starts at the first
/// fleet whose number is greater than `start_after` (wrapping around to the oldest), so the
/// caller passes the fleet that received the last placement of its previous call (0 at first).
/// The result lists the chosen runs in the order they were chosen: round-robin over fleets, run
/// order within a fleet; its last entry's fleet is the next call's `start_after`.
pub fn place(
    now_ms: u64,
    free_slots: u32,
    fleets: &[FleetSlots<'_>],
    start_after: u64,
) -> Vec<Placement> {
    debug_assert!(
        fleets
            .windows(2)
            .all(|w| w[0].fleet_number < w[1].fleet_number)
    );
    let first = fleets.partition_point(|fleet| fleet.fleet_number <= start_after);
    let rotated = fleets[first..].iter().chain(fleets[..first].iter());
    // Per fleet: the eligible runs it can take, capped by its available parallelism.
    let mut queues: Vec<(u64, Vec<u32>)> = rotated
        .map(|fleet| {
            let eligible: Vec<u32> = fleet
                .pending
                .iter()
                .filter(|(_, not_before_ms)| *not_before_ms <= now_ms)
                .map(|(run_index, _)| *run_index)
                .take(fleet.available.min(free_slots) as usize)
                .collect();
            (fleet.fleet_number, eligible)
        })
        .filter(|(_, eligible)| !eligible.is_empty())
        .collect();
    let mut chosen = Vec::with_capacity(free_slots as usize);
    let mut cursors = vec![0usize; queues.len()];
    while chosen.len() < free_slots as usize && !queues.is_empty() {
        let mut progressed = false;
        for (queue, cursor) in queues.iter_mut().zip(cursors.iter_mut()) {
            if chosen.len() == free_slots as usize {
                break;
            }
            if let Some(run_index) = queue.1.get(*cursor) {
                chosen.push(Placement {
                    fleet_number: queue.0,
                    run_index: *run_index,
                });
                *cursor += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(fleet_number, available, [(run_index, not_before_ms)])`.
    type ParsedFleet = (u64, u32, Vec<(u32, u64)>);

    /// Data-driven check. `fleets` is a list of lines `"<fleet_number> available=<n> pending=<i>[@<not_before>],..."`;
    /// `expected` is the placements as `"<fleet>.<run> ..."`.
    fn check(now_ms: u64, free_slots: u32, fleets: &[&str], expected: &str) {
        check_from(now_ms, free_slots, fleets, 0, expected);
    }

    /// [`check`] with the rotation starting after fleet `start_after`.
    fn check_from(now_ms: u64, free_slots: u32, fleets: &[&str], start_after: u64, expected: &str) {
        let parsed: Vec<ParsedFleet> = fleets
            .iter()
            .map(|line| {
                let mut parts = line.split_whitespace();
                let number: u64 = parts.next().unwrap().parse().unwrap();
                let available: u32 = parts
                    .next()
                    .unwrap()
                    .strip_prefix("available=")
                    .unwrap()
                    .parse()
                    .unwrap();
                let pending = parts
                    .next()
                    .unwrap()
                    .strip_prefix("pending=")
                    .unwrap()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|item| match item.split_once('@') {
                        Some((run, not_before)) => {
                            (run.parse().unwrap(), not_before.parse().unwrap())
                        }
                        None => (item.parse().unwrap(), 0),
                    })
                    .collect();
                (number, available, pending)
            })
            .collect();
        let slots: Vec<FleetSlots<'_>> = parsed
            .iter()
            .map(|(fleet_number, available, pending)| FleetSlots {
                fleet_number: *fleet_number,
                available: *available,
                pending,
            })
            .collect();
        let actual: Vec<String> = place(now_ms, free_slots, &slots, start_after)
            .iter()
            .map(|p| format!("{}.{}", p.fleet_number, p.run_index))
            .collect();
        assert_eq!(actual.join(" "), expected);
    }

    #[test]
    fn fills_free_slots_in_run_order() {
        check(0, 2, &["1 available=10 pending=0,1,2"], "1.0 1.1");
        check(0, 5, &["1 available=10 pending=0,1,2"], "1.0 1.1 1.2");
        check(0, 0, &["1 available=10 pending=0,1,2"], "");
        check(0, 3, &[], "");
    }

    #[test]
    fn respects_max_parallelism() {
        check(0, 8, &["1 available=2 pending=0,1,2,3"], "1.0 1.1");
        check(0, 8, &["1 available=0 pending=0,1,2,3"], "");
    }

    #[test]
    fn skips_runs_in_backoff() {
        check(
            100,
            3,
            &["1 available=5 pending=0@500,1,2@100,3"],
            "1.1 1.2 1.3",
        );
        check(1_000, 3, &["1 available=5 pending=0@500,1"], "1.0 1.1");
    }

    #[test]
    fn shares_slots_round_robin_oldest_first() {
        check(
            0,
            5,
            &[
                "1 available=9 pending=0,1,2,3",
                "2 available=9 pending=0,1",
                "3 available=1 pending=7,8",
            ],
            "1.0 2.0 3.7 1.1 2.1",
        );
        check(
            0,
            2,
            &["1 available=9 pending=0,1,2,3", "2 available=9 pending=0,1"],
            "1.0 2.0",
        );
        check(
            0,
            9,
            &[
                "1 available=1 pending=0,1",
                "2 available=0 pending=5",
                "4 available=3 pending=2,3",
            ],
            "1.0 4.2 4.3",
        );
    }

    #[test]
    fn the_rotation_continues_after_the_last_served_fleet() {
        let fleets = [
            "1 available=9 pending=0,1,2",
            "2 available=9 pending=0,1",
            "3 available=9 pending=5",
        ];
        check_from(0, 1, &fleets, 0, "1.0");
        check_from(0, 1, &fleets, 1, "2.0");
        check_from(0, 1, &fleets, 2, "3.5");
        check_from(0, 1, &fleets, 3, "1.0");
        check_from(0, 4, &fleets, 2, "3.5 1.0 2.0 1.1");
        // A fleet number that no longer exists (finished, compacted) still orders the rotation.
        check_from(
            0,
            2,
            &["1 available=9 pending=0", "4 available=9 pending=0"],
            2,
            "4.0 1.0",
        );
        check_from(
            0,
            1,
            &["1 available=9 pending=0", "4 available=9 pending=0"],
            9,
            "1.0",
        );
        // Fleets with nothing eligible are passed over.
        check_from(
            0,
            2,
            &[
                "1 available=9 pending=0",
                "2 available=0 pending=0",
                "3 available=9 pending=0@50",
            ],
            1,
            "1.0",
        );
    }
}
