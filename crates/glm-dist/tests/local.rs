//! The in-process backend: the shared backend checks at several world sizes, then its failure
//! handling (an error, a panic or a missing rank must end the run promptly, never hang it).

use std::time::{Duration, Instant};

use glm_dist::{testing, Error, LocalComm, ReduceOp};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn collectives_and_groups_on_1_to_4_ranks() -> anyhow::Result<()> {
    for world in 1..=4 {
        let out = LocalComm::run(world, TIMEOUT, |c| {
            testing::check_all(&c)?;
            Ok(c.rank())
        })?;
        assert_eq!(out, (0..world).collect::<Vec<_>>());
    }
    Ok(())
}

#[test]
fn reductions_are_bit_identical_and_in_rank_order() -> anyhow::Result<()> {
    // 1e8 + 1 - 1e8 in f32 depends on the order: rank order 0..n gives 0 exactly on every rank.
    let out = LocalComm::run(3, TIMEOUT, |c| {
        let mut x = [[1e8f32, 1.0, -1e8][c.rank()]];
        c.all_reduce_f32(&mut x, ReduceOp::Sum)?;
        Ok(x[0].to_bits())
    })?;
    assert_eq!(out, vec![0f32.to_bits(); 3]);
    Ok(())
}

#[test]
fn an_error_on_one_rank_ends_the_run_with_that_error() {
    let t0 = Instant::now();
    let res = LocalComm::run(4, TIMEOUT, |c| {
        for step in 0..100 {
            if c.rank() == 2 && step == 5 {
                return Err(Error::Comm("rank 2 gave up at step 5".into()));
            }
            let mut x = [1f32];
            c.all_reduce_f32(&mut x, ReduceOp::Sum)?;
        }
        Ok(())
    });
    let e = res.expect_err("the run should fail").to_string();
    assert_eq!(e, "rank 2 gave up at step 5");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

#[test]
fn a_panic_on_one_rank_ends_the_run() {
    let t0 = Instant::now();
    let res = LocalComm::run(3, TIMEOUT, |c| {
        c.barrier()?;
        if c.rank() == 1 {
            panic!("boom on rank 1");
        }
        // The survivors wait in a sub-group's collective: the failure reaches every group.
        let sub = c.split(0, c.rank())?;
        sub.barrier()?;
        Ok(())
    });
    let e = res.expect_err("the run should fail").to_string();
    assert!(e.contains("rank 1 panicked: boom on rank 1"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

#[test]
fn a_rank_that_never_arrives_times_out_naming_the_collective() {
    let t0 = Instant::now();
    let res = LocalComm::run(3, Duration::from_millis(300), |c| {
        if c.rank() == 1 {
            // Stuck (not failed, not finished) well past the others' timeout.
            std::thread::sleep(Duration::from_millis(1500));
        }
        let mut x = vec![0f64; 4];
        c.all_reduce_f64(&mut x, ReduceOp::Max)?;
        Ok(())
    });
    let e = res.expect_err("the run should fail").to_string();
    assert!(e.contains("all_reduce_f64 on rank"), "{e}");
    assert!(e.contains("timed out after 0.3 s waiting for rank(s) [1]"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

#[test]
fn a_rank_that_finishes_early_is_reported_at_once() {
    let t0 = Instant::now();
    let res = LocalComm::run(2, TIMEOUT, |c| {
        if c.rank() == 0 {
            c.recv_bytes(1)?;
        }
        Ok(())
    });
    let e = res.expect_err("the run should fail").to_string();
    assert!(e.contains("rank 1 finished its run without joining it"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}

#[test]
fn mismatched_collectives_and_lengths_are_errors() {
    let res = LocalComm::run(2, TIMEOUT, |c| {
        if c.rank() == 0 {
            c.barrier()
        } else {
            c.all_reduce_f32(&mut [1.0], ReduceOp::Sum)
        }
    });
    assert!(res.expect_err("should fail").to_string().contains("out of step"));
    let res = LocalComm::run(2, TIMEOUT, |c| {
        let mut x = vec![1f32; 2 + c.rank()];
        c.all_reduce_f32(&mut x, ReduceOp::Sum)
    });
    assert!(res.expect_err("should fail").to_string().contains("different lengths"));
}

#[test]
fn p2p_messages_are_buffered_in_any_order() -> anyhow::Result<()> {
    // Every rank sends to every other before receiving anything: only buffered sends survive it.
    let out = LocalComm::run(4, TIMEOUT, |c| {
        let (r, n) = (c.rank(), c.size());
        for q in (0..n).filter(|&q| q != r) {
            c.send_bytes(&[r as u8, q as u8], q)?;
        }
        let mut got = Vec::new();
        for q in (0..n).rev().filter(|&q| q != r) {
            got.push(c.recv_bytes(q)?);
        }
        Ok(got)
    })?;
    for (r, got) in out.iter().enumerate() {
        let want: Vec<Vec<u8>> = (0..4).rev().filter(|&q| q != r).map(|q| vec![q as u8, r as u8]).collect();
        assert_eq!(got, &want);
    }
    Ok(())
}

#[test]
fn zero_ranks_is_an_error() {
    assert!(LocalComm::run(0, TIMEOUT, |_c| Ok(())).is_err());
}
