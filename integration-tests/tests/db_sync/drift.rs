//! Drift: a fleet source's node histories (or named sources) grouped by their latest root,
//! each outlier group with the paths its tree differs in from the most common one, paged; and
//! `merklectl drift` printing it.

use integration_tests::{TestStack, run_merklectl};
use merkle_core::{Profile, diff::diff_all};
use merkle_proto::dbsync::v1::{DriftGroup, GetDriftRequest, GetDriftResponse};
use merkle_shared::convert::change_from_proto;
use tonic::Code;

use super::support::*;

fn nodes_of(group: &DriftGroup) -> Vec<&str> {
    group.members.iter().map(|m| m.node.as_str()).collect()
}

async fn drift(c: &mut Client, request: GetDriftRequest) -> GetDriftResponse {
    c.get_drift(request).await.expect("drift").into_inner()
}

fn fleet(name: &str) -> GetDriftRequest {
    GetDriftRequest {
        fleet_source: name.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_groups_a_fleets_nodes_by_root_with_each_outliers_differing_paths() {
    let mut stack = TestStack::new();
    let mut c = start(&mut stack, &[]).await;
    let mut t = wide_tree(4, 6);
    let base = t.tree.clone();
    for node in ["n1", "n2", "n3", "n4", "n5"] {
        push(&mut c, &format!("web@{node}"), &t).await;
    }
    // Two nodes gained the same file; one had a file edited, another removed and one added.
    t.edit("d01/e0/extra", "new");
    let added = t.tree.clone();
    push(&mut c, "web@n7", &t).await;
    push(&mut c, "web@n8", &t).await;
    let mut u = wide_tree(4, 6);
    u.edit("d02/e1/f001", "edited");
    std::fs::remove_file(u.dir.path().join("d03/e2/f002")).expect("rm");
    u.edit("d00/e0/late", "x");
    let edited = u.tree.clone();
    push(&mut c, "web@n6", &u).await;
    // Neighbours by name that are not nodes of `web`: a plain source, another fleet's nodes.
    push(&mut c, "web", &u).await;
    push(&mut c, "web-2@n1", &u).await;
    push(&mut c, "webb@n1", &u).await;

    let all = drift(&mut c, fleet("web")).await;
    assert_eq!(
        (all.source_count, all.outlier_count, all.outlier_group_count),
        (8, 3, 2)
    );
    assert!(all.next_page_token.is_empty());
    let baseline = all.baseline.as_ref().expect("baseline");
    assert_eq!(baseline.root_hash, base.root.to_hex());
    assert_eq!(baseline.member_count, 5);
    assert_eq!(nodes_of(baseline), ["n1", "n2", "n3", "n4", "n5"]);
    assert_eq!(baseline.members[0].source, "web@n1");
    assert!(baseline.changes.is_empty());
    // Most members first; each group's paths are the core's diff from the baseline.
    let [two, one] = &all.outliers[..] else {
        panic!("two outlier groups: {:?}", all.outliers)
    };
    assert_eq!(
        (two.root_hash.as_str(), nodes_of(two)),
        (added.root.to_hex().as_str(), vec!["n7", "n8"])
    );
    assert_eq!(
        (one.root_hash.as_str(), nodes_of(one)),
        (edited.root.to_hex().as_str(), vec!["n6"])
    );
    for (group, tree) in [(two, &added), (one, &edited)] {
        let expected = diff_all(&base, base.root, tree, tree.root).expect("core diff");
        let got: Vec<_> = group
            .changes
            .iter()
            .map(|ch| change_from_proto(ch).expect("change"))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(group.change_count, expected.len() as u64);
        assert!(group.incomparable.is_empty());
    }
    assert_eq!(one.change_count, 3, "edited, removed, added");

    // merklectl prints the same, exiting 1 because some nodes differ.
    let addr = stack.service("db-sync").uri();
    let (code, out, err) = run_merklectl(&["drift", "web", "--addr", &addr, "--paths", "2"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "web: 8 nodes, 3 roots; 3 differ from the most common root"
    );
    assert!(
        lines[2].starts_with(&base.root.to_hex()[..16])
            && lines[2].contains("baseline")
            && lines[2].ends_with("n1, n2, n3, n4, n5"),
        "{out}"
    );
    assert!(
        lines[3].ends_with("n7, n8") && out.contains("    A d01/e0/extra\n"),
        "{out}"
    );
    assert!(out.contains("    ... 1 more paths (--paths)"), "{out}");
    let (code, out, err) = run_merklectl(&["drift", "web", "--addr", &addr, "--json"]);
    assert_eq!(code, Some(1), "{err}");
    let groups: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[0]["baseline"], true);
    assert_eq!(groups[2]["change_count"], 3);
    assert_eq!(groups[1]["changes"][0]["path"], "d01/e0/extra");
    let (code, _, err) = run_merklectl(&["drift", "web@n1", "web@n2", "--addr", &addr]);
    assert_eq!(code, Some(0), "alike: {err}");
    let (code, _, err) = run_merklectl(&["drift", "nothing", "--addr", &addr]);
    assert!(
        code == Some(2) && err.contains("no node of nothing has a snapshot"),
        "{err}"
    );

    // Paged one group at a time; later pages see the fleet as the first page did, even after
    // it moved on: every node now has n6's tree but n1.
    let first = drift(
        &mut c,
        GetDriftRequest {
            page_size: 1,
            max_changes: 1,
            ..fleet("web")
        },
    )
    .await;
    assert_eq!(first.outliers.len(), 1);
    assert_eq!(first.outliers[0].root_hash, added.root.to_hex());
    let one_change = &first.outliers[0];
    assert_eq!((one_change.changes.len(), one_change.change_count), (1, 1));
    for node in ["n2", "n3", "n4", "n5", "n7", "n8"] {
        push(&mut c, &format!("web@{node}"), &u).await;
    }
    let second = drift(
        &mut c,
        GetDriftRequest {
            page_size: 1,
            max_changes: 1,
            page_token: first.next_page_token.clone(),
            ..fleet("web")
        },
    )
    .await;
    let baseline = second.baseline.as_ref().expect("baseline");
    assert_eq!(baseline.root_hash, base.root.to_hex());
    assert_eq!(nodes_of(baseline), ["n1", "n2", "n3", "n4", "n5"]);
    assert_eq!(second.outliers.len(), 1);
    assert_eq!(second.outliers[0].root_hash, edited.root.to_hex());
    assert_eq!(nodes_of(&second.outliers[0]), ["n6"]);
    assert_eq!(
        (
            second.outliers[0].changes.len(),
            second.outliers[0].change_count
        ),
        (1, 3)
    );
    assert!(second.next_page_token.is_empty());
    // A fresh first page sees the moves: n6's tree is the baseline now, n1 the outlier.
    let now = drift(&mut c, fleet("web")).await;
    assert_eq!(
        now.baseline.as_ref().expect("baseline").root_hash,
        edited.root.to_hex()
    );
    assert_eq!(nodes_of(&now.outliers[0]), ["n1"]);

    // A token is bound to its question.
    let err = c
        .get_drift(GetDriftRequest {
            page_token: first.next_page_token.clone(),
            ..fleet("webb")
        })
        .await
        .expect_err("another fleet's token");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_token"), "{}", err.message());

    // Named sources: plain and node histories alike, members without node ids.
    let named = drift(
        &mut c,
        GetDriftRequest {
            sources: vec!["web".into(), "web@n1".into(), "web-2@n1".into()],
            ..Default::default()
        },
    )
    .await;
    let baseline = named.baseline.as_ref().expect("baseline");
    assert_eq!(baseline.root_hash, edited.root.to_hex());
    assert_eq!(
        baseline
            .members
            .iter()
            .map(|m| (m.source.as_str(), m.node.as_str()))
            .collect::<Vec<_>>(),
        [("web", ""), ("web-2@n1", "")]
    );
    assert_eq!(named.outliers[0].members[0].source, "web@n1");
    assert_eq!(named.outliers[0].change_count, 3);

    // A tree of another profile is reported, not compared.
    let (outcome, full) = merklectl::local::build_tree(
        t.dir.path(),
        merkle_core::build::BuildOptions {
            profile: Profile::Full,
            ..Default::default()
        },
    )
    .expect("build");
    merklectl::stored::upload(&mut c, "web@n9", "", &full, &outcome.stats)
        .await
        .expect("upload");
    let mixed = drift(&mut c, fleet("web")).await;
    let other = mixed
        .outliers
        .iter()
        .find(|g| g.root_hash == full.root.to_hex())
        .expect("the full-profile group");
    assert!(
        other.incomparable.contains("full") && other.changes.is_empty(),
        "{other:?}"
    );

    // Bad questions name the field and the rule.
    for (request, code, start) in [
        (
            GetDriftRequest::default(),
            Code::InvalidArgument,
            "fleet_source: set fleet_source, or sources",
        ),
        (fleet("web@n1"), Code::InvalidArgument, "fleet_source: "),
        (
            GetDriftRequest {
                sources: vec!["web".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "sources: has 1 names; compare 2 to 1000",
        ),
        (
            GetDriftRequest {
                sources: vec!["web".into(), "web".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "sources[1]: names \"web\" twice",
        ),
        (
            GetDriftRequest {
                sources: vec!["web".into(), "nothing".into()],
                ..Default::default()
            },
            Code::NotFound,
            "sources[1]: nothing has no snapshots",
        ),
        (
            fleet("nothing"),
            Code::NotFound,
            "fleet_source: no node of nothing has a snapshot",
        ),
    ] {
        let err = c.get_drift(request).await.expect_err(start);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().starts_with(start), "{}", err.message());
    }
}
