//! Black-box tests of the exchange through its supplier API: the real app on a real port,
//! simulated buyers on real sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use leadex::sim::{Behaviour, BidSpec};
use serde_json::{Value, json};

fn ids(v: &Value) -> Vec<String> {
    v["buyer_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_owned())
        .collect()
}

#[actix_web::test]
async fn best_bid_in_time_wins_and_only_the_winner_gets_a_post() {
    let (a, b, c) = (sim("12.50", 5), sim("30", 20), sim("20", 1));
    let buyers = ping_buyer("a", &a, "") + &ping_buyer("b", &b, "") + &ping_buyer("c", &c, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;

    let (status, raw) = app.post_lead_raw(&lead()).await;
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains(r#""status":"sold","price":30.00,"buyer_ids":["b"]"#),
        "two decimals on the wire: {raw}"
    );
    let body: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(ids(&body), vec!["b"]);
    assert!(body["lead_id"].as_str().is_some_and(|id| id.len() == 26));
    assert_eq!(
        (a.stats.pings(), b.stats.pings(), c.stats.pings()),
        (1, 1, 1)
    );
    assert_eq!(
        (a.stats.posts(), b.stats.posts(), c.stats.posts()),
        (0, 1, 0)
    );
    let post = &b.stats.post_bodies()[0];
    assert_eq!(post["lead_id"], body["lead_id"]);
    assert_eq!(post["price"], json!(30.0));
    assert_eq!(
        post["lead"]["phone"], "5551234567",
        "the post carries the full, normalised lead"
    );
    assert_eq!(post["lead"]["firstName"], "John");
    assert_eq!(
        post["token"],
        b.stats.ping_bodies()[0]["ping_id"],
        "the ping's token is echoed"
    );
    app.stop().await;
}

#[actix_web::test]
async fn late_bid_is_ignored_and_the_answer_still_comes_in_time() {
    let (late, on_time) = (sim("99", 700), sim("10", 10));
    let buyers = ping_buyer("late", &late, "") + &ping_buyer("on-time", &on_time, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;

    let started = Instant::now();
    let (status, body) = app.post_lead(&lead()).await;
    let took = started.elapsed();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("sold")),
        "{body}"
    );
    assert_eq!(ids(&body), vec!["on-time"]);
    assert_eq!(late.stats.posts(), 0);
    // ping_timeout 300 ms + post_timeout 1000 ms bound the answer; the post here is instant.
    assert!(
        took < Duration::from_millis(1300),
        "answered after {took:?}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn no_bids_means_pending() {
    let (none, broken) = (sim("none", 0), sim("0", 0));
    let buyers = ping_buyer("none", &none, "") + &ping_buyer("zero", &broken, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["success", "lead_id", "status"]
    );
    assert_eq!(body["status"], "pending");
    assert_eq!(none.stats.posts() + broken.stats.posts(), 0);
    app.stop().await;
}

#[actix_web::test]
async fn pings_carry_no_personal_field() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config(
        &data_dir(),
        "personal_fields = [\"city\"]",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    let mut lead = lead();
    lead["address"] = json!("1 Main St");
    lead["homeowner"] = json!("yes");
    let (status, _) = app.post_lead(&lead).await;
    assert_eq!(status, 200);
    let ping = &buyer.stats.ping_bodies()[0];
    assert_eq!(ping["campaign"], "acme-auto");
    assert_eq!(ping["category"], "Auto Insurance");
    assert!(ping["ping_id"].is_string());
    let fields = ping["lead"].as_object().unwrap();
    for personal in ["firstName", "lastName", "email", "phone", "address", "city"] {
        assert!(
            !fields.contains_key(personal),
            "ping leaked {personal}: {ping}"
        );
    }
    assert_eq!(fields["state"], "TX");
    assert_eq!(
        fields["homeowner"], "yes",
        "unknown fields reach buyers as sent"
    );
    let post = &buyer.stats.post_bodies()[0];
    assert_eq!(post["lead"]["address"], "1 Main St");
    app.stop().await;
}

#[actix_web::test]
async fn refused_post_falls_back_to_the_next_bid() {
    let refuser = sim_with(Behaviour {
        bid: BidSpec::parse("50").unwrap(),
        ping_latency_ms: (0, 0),
        post_latency_ms: (0, 0),
        reject_rate: 1.0,
    });
    let second = sim("40", 5);
    let third = sim("30", 5);
    let buyers = ping_buyer("refuser", &refuser, "")
        + &ping_buyer("second", &second, "")
        + &ping_buyer("third", &third, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["second"]);
    assert_eq!(body["price"], json!(40.0));
    assert_eq!(
        (
            refuser.stats.posts(),
            second.stats.posts(),
            third.stats.posts()
        ),
        (1, 1, 0)
    );
    app.stop().await;
}

#[actix_web::test]
async fn direct_post_buyer_wins_with_its_fixed_price() {
    let (pinged, direct) = (sim("20", 1), sim("none", 0));
    let buyers = ping_buyer("pinged", &pinged, "") + &direct_buyer("direct", &direct, "25.5", "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold");
    assert_eq!(ids(&body), vec!["direct"]);
    assert_eq!(body["price"], json!(25.5));
    assert_eq!(
        direct.stats.pings(),
        0,
        "a direct-post buyer is never pinged"
    );
    assert_eq!(direct.stats.posts(), 1);
    assert_eq!(pinged.stats.posts(), 0);
    app.stop().await;
}

#[actix_web::test]
async fn max_buyers_two_sells_to_the_top_two_and_sums_prices() {
    let (a, b, c) = (sim("10", 1), sim("30", 1), sim("20", 1));
    let buyers = ping_buyer("a", &a, "") + &ping_buyer("b", &b, "") + &ping_buyer("c", &c, "");
    let app = TestApp::spawn(&config(&data_dir(), "max_buyers = 2", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold");
    assert_eq!(ids(&body), vec!["b", "c"]);
    assert_eq!(body["price"], json!(50.0));
    assert_eq!(
        (a.stats.posts(), b.stats.posts(), c.stats.posts()),
        (0, 1, 1)
    );
    app.stop().await;
}

#[actix_web::test]
async fn bids_under_either_floor_are_dropped() {
    let (cheap, picky, fine) = (sim("4.99", 1), sim("9", 1), sim("6", 1));
    let buyers = ping_buyer("cheap", &cheap, "")
        + &ping_buyer("picky", &picky, "floor_price = 10")
        + &ping_buyer("fine", &fine, "");
    let app = TestApp::spawn(&config(&data_dir(), "floor_price = 5.0", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(ids(&body), vec!["fine"], "{body}");
    assert_eq!(body["price"], json!(6.0));
    assert_eq!(cheap.stats.posts() + picky.stats.posts(), 0);

    // With only under-floor bids the lead stays pending.
    fine.set_behaviour(Behaviour {
        bid: BidSpec::Nothing,
        ..Behaviour::default()
    });
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "pending");
    app.stop().await;
}

#[actix_web::test]
async fn a_sold_lead_is_readable_after_a_restart() {
    let buyer = sim("17.25", 1);
    let data = data_dir();
    let text = config(&data, "", &ping_buyer("a", &buyer, ""));
    let app = TestApp::spawn(&text).await;
    let (_, sold) = app.post_lead(&lead()).await;
    let lead_id = sold["lead_id"].as_str().unwrap().to_owned();
    app.stop().await;

    let app = TestApp::spawn(&text).await;
    let (status, body) = app.get_lead(KEY, &lead_id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["lead_id"], lead_id.as_str());
    assert_eq!(body["status"], "sold");
    assert_eq!(body["price"], json!(17.25));
    assert_eq!(body["buyer_ids"], json!(["a"]));
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
    let (status, body) = app.get_lead(OTHER_KEY, &lead_id).await;
    assert_eq!(status, 404, "another supplier cannot see it: {body}");
    assert_eq!(body["success"], false);
    app.stop().await;
}

#[actix_web::test]
async fn concurrent_leads_are_each_answered_once_and_posted_once() {
    let (a, b) = (sim("10-40", 2), sim("10-40", 2));
    let buyers = ping_buyer("a", &a, "") + &ping_buyer("b", &b, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let body = lead();
    let answers = futures::future::join_all((0..200).map(|_| app.post_lead(&body))).await;
    let mut lead_ids = std::collections::HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["status"], "sold", "{body}");
        assert!(
            lead_ids.insert(body["lead_id"].as_str().unwrap().to_owned()),
            "lead ids are unique"
        );
    }
    assert_eq!(
        a.stats.posts() + b.stats.posts(),
        200,
        "each lead posted exactly once"
    );
    let mut posted: Vec<String> = a
        .stats
        .post_bodies()
        .iter()
        .chain(b.stats.post_bodies().iter())
        .map(|p| p["lead_id"].as_str().unwrap().to_owned())
        .collect();
    posted.sort();
    posted.dedup();
    assert_eq!(posted.len(), 200);
    app.stop().await;
}

#[actix_web::test]
async fn authentication_and_campaign_errors() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config(&data_dir(), "", &ping_buyer("a", &buyer, ""))).await;

    let (status, _, body) = app.post_lead_as("wrong-key", &lead()).await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"success": false, "error": "Invalid API Key", "message": "API key missing or invalid"})
    );

    let (status, _, body) = app.post_lead_as(OTHER_KEY, &lead()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("Invalid API Key")),
        "key for another seller"
    );

    let mut unknown_seller = lead();
    unknown_seller["seller"] = json!("NOPE0000");
    let (status, _, body) = app.post_lead_as(KEY, &unknown_seller).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("Invalid API Key")),
        "unknown seller looks like a bad key"
    );

    let mut unknown = lead();
    unknown["category"] = json!("Pet Insurance");
    let (status, _, body) = app.post_lead_as(KEY, &unknown).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "No matching campaign");

    let mut missing = lead();
    missing.as_object_mut().unwrap().remove("lastName");
    missing["phone"] = json!(" ");
    let (status, _, body) = app.post_lead_as(KEY, &missing).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "Missing required field");
    assert_eq!(body["fields"], json!(["lastName", "phone"]));

    let response = app
        .client
        .post(app.url("/api/leads"))
        .json(&lead())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401, "no Authorization header");
    assert_eq!(buyer.stats.pings(), 0, "nothing refused reached a buyer");
    app.stop().await;
}
