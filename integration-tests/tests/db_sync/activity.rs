//! Change activity: a page of sources, each with its latest snapshot's time, its snapshot
//! count and its snapshots per day (UTC), in the order asked; bad input named.

use integration_tests::TestStack;
use merkle_proto::dbsync::v1::GetChangeActivityRequest;
use tonic::Code;

use super::support::*;

fn ask(sources: &[&str], days: u32) -> GetChangeActivityRequest {
    GetChangeActivityRequest {
        sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        days,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn change_activity_counts_each_sources_snapshots_per_day_in_the_order_asked() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let before = std::time::SystemTime::now();
    // docs changes three times (three snapshots), site once; an unchanged push stores none.
    let mut docs = wide_tree(2, 2);
    push(&mut c, "docs", &docs).await;
    docs.edit("d00/e0/f000", "second");
    push(&mut c, "docs", &docs).await;
    push(&mut c, "docs", &docs).await;
    docs.edit("d01/e1/f001", "third");
    push(&mut c, "docs", &docs).await;
    push(&mut c, "site", &wide_tree(1, 1)).await;

    let answer = c
        .get_change_activity(ask(&["site", "new", "docs"], 0))
        .await
        .expect("activity")
        .into_inner();
    let names: Vec<&str> = answer.sources.iter().map(|a| a.source.as_str()).collect();
    assert_eq!(names, ["site", "new", "docs"]);
    // 0 days means two weeks, the last of them today.
    for a in &answer.sources {
        assert_eq!(a.changes_per_day.len(), 14, "{}", a.source);
    }
    let docs = &answer.sources[2];
    assert_eq!(docs.snapshot_count, 3);
    assert_eq!(docs.changes_per_day[13], 3, "{:?}", docs.changes_per_day);
    assert_eq!(docs.changes_per_day[..13].iter().sum::<u32>(), 0);
    let changed =
        std::time::SystemTime::try_from(docs.last_change_time.expect("time")).expect("a time");
    assert!(changed >= before - std::time::Duration::from_secs(5));
    assert_eq!(answer.sources[0].snapshot_count, 1);
    assert_eq!(answer.sources[0].changes_per_day[13], 1);
    // A source with no snapshot yet: zeros, no time, no error.
    let new = &answer.sources[1];
    assert_eq!(new.snapshot_count, 0);
    assert!(new.last_change_time.is_none());
    assert!(new.changes_per_day.iter().all(|n| *n == 0));
    let first_day = std::time::SystemTime::try_from(answer.first_day.expect("first day"))
        .expect("a time")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    assert_eq!(first_day % 86_400, 0, "a UTC midnight");

    let one = c
        .get_change_activity(ask(&["docs"], 1))
        .await
        .expect("activity")
        .into_inner();
    assert_eq!(one.sources[0].changes_per_day, [3]);

    let many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    let refused = [
        (ask(&[], 0), "sources: has 0 names; name 1 to 100"),
        (
            GetChangeActivityRequest {
                sources: many,
                days: 0,
            },
            "sources: has 101 names",
        ),
        (
            ask(&["docs", "docs"], 0),
            "sources[1]: names \"docs\" twice",
        ),
        (ask(&["docs", "Bad Name"], 0), "sources[1]:"),
        (ask(&["docs"], 32), "days: is 32; count 1 to 31 days"),
    ];
    for (request, start) in refused {
        let status = c.get_change_activity(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().starts_with(start),
            "{:?} does not start with {start:?}",
            status.message()
        );
    }
}
