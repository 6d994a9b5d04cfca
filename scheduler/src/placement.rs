//! Placement: which pending runs a worker with free slots receives. Pure functions, no I/O.
//!
//! Policy, in order:
//! 1. a run in retry backoff (`not_before_ms > now_ms`) is not eligible (the caller passes
//!    only eligible runs: also within the fleet's current wave, of a fleet neither paused nor
//!    at a gate);
//! 2. a fleet never holds more than `max_parallelism` leases at once;
//! 3. fleets of a higher `flow.priority` are served first; a fleet whose runs all wait on a
//!    limit does not hold back fleets of a lower priority (placement is work-conserving);
//! 4. fleets of one priority share slots round-robin, and the rotation continues across
//!    requests: a request starts with the first fleet after the one that received the previous
//!    request's last slot (`start_after`, kept in the replicated state). So workers asking for
//!    one slot at a time are served fleet 1, 2, 3, 1, 2, 3..., and a large old fleet cannot
//!    starve a newer one (the fair share that Nomad and Hatchet users ask for);
//! 5. within a fleet, runs go in submission order, each only if `admit` accepts it (the
//!    cluster's limits and repository exclusivity, [`crate::limit::admission`]); a run it
//!    refuses is passed over for the fleet's next, and when a limit the whole fleet shares
//!    holds it ([`Admission::FleetBlocked`]), the fleet's other runs are not asked.

/// A fleet as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSlots<I> {
    /// The fleet's number (its order of submission).
    pub fleet_number: u64,
    /// Its `flow.priority`: higher first.
    pub priority: u32,
    /// Leases the fleet may still take: `max_parallelism - running`, saturating at 0.
    pub available: u32,
    /// Its eligible pending runs (run indices), in run order.
    pub candidates: I,
}

/// What the admission function says of one candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Lease it.
    Placed,
    /// Not this run; the fleet's next may do.
    Passed,
    /// Not this run, nor any other of its fleet in this placement (a limit its whole fleet
    /// shares holds it).
    FleetBlocked,
}

/// One placement decision: lease run `run_index` of fleet `fleet_number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    /// The fleet's number.
    pub fleet_number: u64,
    /// The run's index within its fleet.
    pub run_index: u32,
}

/// The runs of `pending` (`(run_index, not_before_ms)` in run order) out of retry backoff at
/// `now_ms`, at most `max_scanned` of `pending` looked at (a bound on the work of one
/// placement: runs further on wait for a later one).
pub fn eligible(
    pending: impl Iterator<Item = (u32, u64)>,
    now_ms: u64,
    max_scanned: usize,
) -> impl Iterator<Item = u32> {
    pending
        .take(max_scanned)
        .filter(move |(_, not_before_ms)| *not_before_ms <= now_ms)
        .map(|(run_index, _)| run_index)
}

/// Chooses at most `free_slots` runs for one worker (module documentation).
///
/// `fleets` must be ordered by `fleet_number` (oldest first). Within a priority, the rotation
/// starts at the first fleet whose number is greater than `start_after` (wrapping around to
/// the oldest), so the caller passes the fleet that received the last placement of its
/// previous call (0 at first). `admit` is asked about each candidate in turn and says whether
/// it is placed. The result lists the chosen runs in the order they were chosen; its last
/// entry's fleet is the next call's `start_after`.
pub fn place<I: Iterator<Item = u32>>(
    free_slots: u32,
    fleets: Vec<FleetSlots<I>>,
    start_after: u64,
    admit: &mut dyn FnMut(Placement) -> Admission,
) -> Vec<Placement> {
    debug_assert!(
        fleets
            .windows(2)
            .all(|w| w[0].fleet_number < w[1].fleet_number)
    );
    let mut priorities: Vec<u32> = fleets.iter().map(|f| f.priority).collect();
    priorities.sort_unstable_by(|a, b| b.cmp(a));
    priorities.dedup();
    let mut fleets: Vec<Option<FleetSlots<I>>> = fleets.into_iter().map(Some).collect();
    let mut chosen = Vec::with_capacity(free_slots as usize);
    for priority in priorities {
        if chosen.len() == free_slots as usize {
            break;
        }
        let mut group: Vec<FleetSlots<I>> = fleets
            .iter_mut()
            .filter(|f| f.as_ref().is_some_and(|f| f.priority == priority))
            .filter_map(Option::take)
            .collect();
        let first = group.partition_point(|fleet| fleet.fleet_number <= start_after);
        group.rotate_left(first);
        round_robin(free_slots, &mut group, admit, &mut chosen);
    }
    chosen
}

/// Serves `group` one placement per fleet per turn until `free_slots` are chosen or no fleet
/// can take another.
fn round_robin<I: Iterator<Item = u32>>(
    free_slots: u32,
    group: &mut [FleetSlots<I>],
    admit: &mut dyn FnMut(Placement) -> Admission,
    chosen: &mut Vec<Placement>,
) {
    loop {
        let mut progressed = false;
        for fleet in group.iter_mut() {
            if chosen.len() == free_slots as usize {
                return;
            }
            if fleet.available == 0 {
                continue;
            }
            let fleet_number = fleet.fleet_number;
            let placed = fleet.candidates.by_ref().map(|run_index| Placement {
                fleet_number,
                run_index,
            });
            for placement in placed {
                match admit(placement) {
                    Admission::Placed => {
                        chosen.push(placement);
                        fleet.available -= 1;
                        progressed = true;
                        break;
                    }
                    Admission::Passed => {}
                    Admission::FleetBlocked => {
                        fleet.available = 0;
                        break;
                    }
                }
            }
        }
        if !progressed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Data-driven check. `fleets` is a list of lines
    /// `"<fleet_number> available=<n> pending=<i>[@<not_before>],... [priority=<p>]"`;
    /// `refused` lists the runs `admit` refuses as `"<fleet>.<run>"`; `expected` is the
    /// placements as `"<fleet>.<run> ..."`.
    fn check(now_ms: u64, free_slots: u32, fleets: &[&str], expected: &str) {
        check_all(now_ms, free_slots, fleets, 0, "", expected);
    }

    /// [`check`] with the rotation starting after fleet `start_after`.
    fn check_from(now_ms: u64, free_slots: u32, fleets: &[&str], start_after: u64, expected: &str) {
        check_all(now_ms, free_slots, fleets, start_after, "", expected);
    }

    fn check_all(
        now_ms: u64,
        free_slots: u32,
        fleets: &[&str],
        start_after: u64,
        refused: &str,
        expected: &str,
    ) {
        let refused: BTreeSet<&str> = refused.split_whitespace().collect();
        let slots: Vec<FleetSlots<std::vec::IntoIter<u32>>> = fleets
            .iter()
            .map(|line| {
                let mut parts = line.split_whitespace();
                let number: u64 = parts.next().unwrap().parse().unwrap();
                let (mut available, mut priority, mut pending) = (0, 50, Vec::new());
                for part in parts {
                    let (name, value) = part.split_once('=').unwrap();
                    match name {
                        "available" => available = value.parse().unwrap(),
                        "priority" => priority = value.parse().unwrap(),
                        "pending" => {
                            pending = value
                                .split(',')
                                .filter(|s| !s.is_empty())
                                .map(|item| match item.split_once('@') {
                                    Some((run, not_before)) => {
                                        (run.parse().unwrap(), not_before.parse().unwrap())
                                    }
                                    None => (item.parse().unwrap(), 0),
                                })
                                .collect()
                        }
                        _ => panic!("{part}"),
                    }
                }
                let candidates: Vec<u32> = eligible(pending.into_iter(), now_ms, 1_000).collect();
                FleetSlots {
                    fleet_number: number,
                    priority,
                    available,
                    candidates: candidates.into_iter(),
                }
            })
            .collect();
        // `<fleet>.<run>` refuses that run; `<fleet>.<run>!` blocks its whole fleet there.
        let mut admit = |p: Placement| {
            let name = format!("{}.{}", p.fleet_number, p.run_index);
            if refused.contains(format!("{name}!").as_str()) {
                Admission::FleetBlocked
            } else if refused.contains(name.as_str()) {
                Admission::Passed
            } else {
                Admission::Placed
            }
        };
        let actual: Vec<String> = place(free_slots, slots, start_after, &mut admit)
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

    #[test]
    fn higher_priorities_are_served_first_and_round_robin_within_one() {
        let fleets = [
            "1 available=9 pending=0,1,2 priority=10",
            "2 available=9 pending=0,1 priority=90",
            "3 available=9 pending=0,1 priority=90",
        ];
        check(0, 3, &fleets, "2.0 3.0 2.1");
        check(0, 6, &fleets, "2.0 3.0 2.1 3.1 1.0 1.1");
        // The rotation resumes within the priority.
        check_from(0, 2, &fleets, 2, "3.0 2.0");
        // A higher priority at its parallelism leaves slots to the lower.
        check(
            0,
            3,
            &[
                "1 available=9 pending=0,1 priority=10",
                "2 available=1 pending=0,1 priority=90",
            ],
            "2.0 1.0 1.1",
        );
    }

    #[test]
    fn runs_the_limits_refuse_are_passed_over_and_do_not_block_others() {
        let fleets = [
            "1 available=2 pending=0,1,2,3 priority=90",
            "2 available=9 pending=0,1",
        ];
        check_all(0, 4, &fleets, 0, "1.0 1.2", "1.1 1.3 2.0 2.1");
        // Every run of the high priority refused: the lower one takes the slots.
        check_all(0, 2, &fleets, 0, "1.0 1.1 1.2 1.3", "2.0 2.1");
        // A refused run does not take from the fleet's parallelism.
        check_all(0, 9, &["1 available=1 pending=0,1"], 0, "1.0", "1.1");
        // A fleet-wide block stops that fleet's candidates at once, not the others'.
        check_all(0, 9, &fleets, 0, "1.1!", "1.0 2.0 2.1");
    }

    #[test]
    fn eligibility_looks_at_a_bounded_number_of_runs() {
        let pending = [(0, 500), (1, 0), (2, 0), (3, 0)];
        let seen: Vec<u32> = eligible(pending.into_iter(), 100, 3).collect();
        assert_eq!(seen, vec![1, 2]);
    }
}
