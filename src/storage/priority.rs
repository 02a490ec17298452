//! A thread's scheduling class, for the embedded store's applier (`embedded::IdleApply`):
//! `SCHED_IDLE` runs a thread only on a core nothing else wants. An unprivileged thread cannot
//! leave `SCHED_IDLE` once in it; root with `CAP_SYS_NICE`, or an `RLIMIT_NICE` of 20 or more,
//! can.

/// Whether a thread of this process can enter `SCHED_IDLE` and leave it again. Tried on a
/// thread of its own, so a refusal leaves no thread stuck at idle priority.
pub fn idle_is_reversible() -> bool {
    std::thread::Builder::new()
        .name("leadex-sched-probe".into())
        .spawn(|| enter_idle() && leave_idle())
        .ok()
        .and_then(|probe| probe.join().ok())
        .unwrap_or(false)
}

/// Puts the calling thread in `SCHED_IDLE`; false where the system refuses (or has none).
pub fn enter_idle() -> bool {
    set_policy(Policy::Idle)
}

/// Puts the calling thread back at normal priority (`SCHED_OTHER`).
pub fn leave_idle() -> bool {
    set_policy(Policy::Normal)
}

/// Whether the calling thread is in `SCHED_IDLE` now.
#[cfg(test)]
pub fn is_idle() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getscheduler only reads the calling thread's (0) policy.
        unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

enum Policy {
    Idle,
    Normal,
}

fn set_policy(policy: Policy) -> bool {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            Policy::Idle => libc::SCHED_IDLE,
            Policy::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` outlives the call; pid 0 is the calling thread.
        unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = policy;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_idle_and_back_where_the_probe_says_it_can() {
        let reversible = idle_is_reversible();
        // The probe ran on a thread of its own: this one was never moved.
        assert!(!is_idle());
        let (entered, was_idle, left, now_idle) = std::thread::spawn(move || {
            if !reversible {
                return (false, false, true, false);
            }
            let entered = enter_idle();
            let was_idle = is_idle();
            let left = leave_idle();
            (entered, was_idle, left, is_idle())
        })
        .join()
        .unwrap();
        if reversible {
            assert!(
                entered && was_idle,
                "the probe went idle, so this thread can"
            );
        }
        assert!(left && !now_idle, "back at normal priority");
    }
}
