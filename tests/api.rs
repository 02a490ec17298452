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
async fn http2_on_both_legs_suppliers_by_h2c_and_buyers_with_http2_true() {
    let (a, b) = (sim("12.50", 0), sim("30", 0));
    let buyers = ping_buyer("a", &a, "http2 = true") + &ping_buyer("b", &b, "");
    let text = config(&data_dir(), "", &buyers).replace("[server]", "[server]\nh2c = true");
    let app = TestApp::spawn(&text).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = h2
            .post(app.url("/api/leads"))
            .bearer_auth(KEY)
            .json(&lead())
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let body: Value = response.json().await.unwrap();
        statuses.push((body["status"].clone(), body["buyer_ids"].clone()));
    }
    assert_eq!(statuses, vec![(json!("sold"), json!(["b"])); 5]);
    // `a` is pinged over h2c, `b` (no `http2`) over HTTP/1.1.
    assert_eq!((a.stats.pings(), a.stats.http2()), (5, 5));
    assert_eq!(
        (b.stats.pings() + b.stats.posts(), b.stats.http2()),
        (10, 0)
    );

    // The h2c buyer goes away and comes back on the same port: the exchange dials again.
    let port = a.addr.port();
    a.stop().await;
    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!((status, body["buyer_ids"].clone()), (200, json!(["b"])));
    let back = leadex::sim::BuyerSim::start(
        &format!("127.0.0.1:{port}"),
        leadex::sim::Behaviour {
            bid: leadex::sim::BidSpec::parse("40").unwrap(),
            ..Default::default()
        },
        1,
    )
    .unwrap();
    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!(
        (status, body["buyer_ids"].clone()),
        (200, json!(["a"])),
        "{body}"
    );
    assert_eq!(
        (back.stats.pings(), back.stats.posts(), back.stats.http2()),
        (1, 1, 2)
    );
    // An idle HTTP/2 client keeps its connection: it leaves before the graceful stop.
    drop(h2);
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
    let refuser = refusing_sim("50");
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
async fn a_post_that_times_out_falls_back_and_the_next_bid_gets_its_own_post_timeout() {
    // post_timeout_ms is 1000 in the test config: the winner takes 1.5 s to answer its post,
    // the next bid 0.6 s, which fits its own timeout and not what the winner's left.
    let slow = sim_with(Behaviour {
        bid: BidSpec::parse("50").unwrap(),
        post_latency_ms: (1500, 1500),
        ..Behaviour::default()
    });
    let next = sim_with(Behaviour {
        bid: BidSpec::parse("40").unwrap(),
        post_latency_ms: (600, 600),
        ..Behaviour::default()
    });
    let buyers = ping_buyer("slow", &slow, "") + &ping_buyer("next", &next, "");
    let (app, store) = TestApp::spawn_with_store(&config(&data_dir(), "", &buyers)).await;
    let started = Instant::now();
    let (status, body) = app.post_lead(&lead()).await;
    let took = started.elapsed();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("sold")),
        "{body}"
    );
    assert_eq!(ids(&body), vec!["next"]);
    assert_eq!(body["price"], json!(40.0));
    assert_eq!((slow.stats.posts(), next.stats.posts()), (1, 1));
    assert!(
        took >= Duration::from_millis(1600),
        "answered after {took:?}"
    );
    let page = app.metrics().await;
    assert_eq!(
        metric(
            &page,
            r#"leadex_buyer_posts_total{buyer="slow",outcome="timeout"}"#
        ),
        Some(1.0)
    );
    // The auction log has the timed-out post, with the time it was given, then the sale.
    let record = store
        .get_lead(body["lead_id"].as_str().unwrap())
        .await
        .unwrap()
        .expect("stored");
    let posts: Vec<(String, String, u64)> = record
        .auction_log
        .iter()
        .filter_map(|event| match event {
            leadex::storage::AuctionEvent::Post {
                buyer,
                outcome,
                latency_us,
                ..
            } => Some((buyer.clone(), outcome.clone(), *latency_us)),
            _ => None,
        })
        .collect();
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert_eq!(
        (posts[0].0.as_str(), posts[0].1.as_str()),
        ("slow", "timeout")
    );
    assert!(posts[0].2 >= 1_000_000, "{posts:?}");
    assert_eq!(
        (posts[1].0.as_str(), posts[1].1.as_str()),
        ("next", "accepted")
    );
    app.stop().await;
}

/// A buyer endpoint on 127.0.0.1:0 that bids `bid` on `/ping` and answers every other path
/// with `307 Temporary Redirect` to `to` (same path), counting the requests it gets.
fn redirecting_buyer(
    bid: f64,
    to: String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use actix_web::{HttpRequest, HttpResponse, web};
    use std::sync::atomic::{AtomicU64, Ordering};
    let hits = std::sync::Arc::new(AtomicU64::new(0));
    let seen = hits.clone();
    let addr = serve_loopback!(move || {
        let (seen, to) = (seen.clone(), to.clone());
        actix_web::App::new().default_service(web::to(move |req: HttpRequest| {
            seen.fetch_add(1, Ordering::Relaxed);
            let location = format!("{to}{}", req.path());
            async move {
                if req.path() == "/ping" {
                    HttpResponse::Ok().json(json!({ "bid": bid }))
                } else {
                    HttpResponse::TemporaryRedirect()
                        .insert_header(("location", location))
                        .finish()
                }
            }
        }))
    });
    (format!("http://{addr}"), hits)
}

#[actix_web::test]
async fn a_buyer_redirect_is_an_answer_and_not_followed() {
    // Where a redirect would take the lead: a simulator that accepts every post.
    let elsewhere = sim("90", 0);
    let (redirector, hits) = redirecting_buyer(50.0, elsewhere.url(""));
    let second = sim("40", 5);
    let buyers = format!(
        "\n[[buyers]]\nid = \"redirector\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{redirector}/ping\"\npost_url = \"{redirector}/post\"\n"
    ) + &ping_buyer("second", &second, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    // The 307 on the post is a refusal: the lead falls back to the next bid...
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["second"]);
    assert_eq!(body["price"], json!(40.0));
    // ...and the lead's personal data never went to where the redirect pointed.
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "one ping, one post"
    );
    assert_eq!((elsewhere.stats.pings(), elsewhere.stats.posts()), (0, 0));
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "leadex_buyer_posts_total{buyer=\"redirector\",outcome=\"http_error\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    app.stop().await;
}

/// `[[buyers]]` for a ping-post buyer behind `front`, with `extra` lines.
fn https_buyer(id: &str, front: &TlsFront, extra: &str) -> String {
    format!(
        "\n[[buyers]]\nid = \"{id}\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{}\"\npost_url = \"{}\"\n{extra}\n",
        front.url("/ping"),
        front.url("/post")
    )
}

#[actix_web::test]
async fn an_https_buyer_on_its_own_ca_is_pinged_and_posted_over_tls_and_http2() {
    let buyer = sim("60", 0);
    let front = tls_front(buyer.addr);
    let second = sim("40", 0);
    let data = data_dir();
    let ca_file = data.join("buyer-ca.pem");
    std::fs::write(&ca_file, &front.ca_pem).unwrap();
    let buyers = https_buyer(
        "secure",
        &front,
        &format!("ca_file = \"{}\"", ca_file.display()),
    ) + &ping_buyer("second", &second, "");
    let app = TestApp::spawn(&config(&data, "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["secure"]);
    assert_eq!(body["price"], json!(60.0));
    assert_eq!((buyer.stats.pings(), buyer.stats.posts()), (1, 1));
    // The buyer offered HTTP/2 by ALPN, so the ping and the post went as streams of it.
    let handshakes = front.handshakes();
    assert!(
        !handshakes.is_empty() && handshakes.iter().all(|p| p == "h2"),
        "{handshakes:?}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn an_https_buyer_whose_certificate_is_not_trusted_gets_no_ping() {
    let buyer = sim("60", 0);
    let front = tls_front(buyer.addr);
    let second = sim("40", 0);
    // No ca_file: the buyer's CA is none of the public roots.
    let buyers = https_buyer("secure", &front, "") + &ping_buyer("second", &second, "");
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["second"]);
    assert_eq!(body["price"], json!(40.0));
    assert_eq!((buyer.stats.pings(), buyer.stats.posts()), (0, 0));
    assert!(front.handshakes().is_empty(), "{:?}", front.handshakes());
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "leadex_buyer_pings_total{buyer=\"secure\",outcome=\"transport_error\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_ca_file_that_cannot_be_read_stops_the_start_before_the_store_opens() {
    let data = data_dir().join("never-made");
    let buyers = format!(
        "\n[[buyers]]\nid = \"secure\"\ncampaigns = [\"acme-auto\"]\nping_url = \"https://127.0.0.1:1/ping\"\npost_url = \"https://127.0.0.1:1/post\"\nca_file = \"{}\"\n",
        data.with_file_name("missing.pem").display()
    );
    let config = leadex::config::Config::from_toml(&config(&data, "", &buyers)).unwrap();
    let err = leadex::startup::Application::build(config, None)
        .await
        .err()
        .expect("no start without the buyer's CA")
        .to_string();
    assert!(
        err.starts_with("buyer secure: ca_file ") && err.contains("missing.pem"),
        "{err}"
    );
    assert!(!data.exists(), "the store was not opened");
}

#[actix_web::test]
async fn a_post_that_cannot_be_delivered_falls_back_and_its_cause_is_in_the_auction_log() {
    let bidder = sim("50", 0);
    // Its posts go to a loopback port with nothing listening on it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let second = sim("40", 0);
    let buyers = format!(
        "\n[[buyers]]\nid = \"gone\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{}\"\npost_url = \"http://{closed}/post\"\n",
        bidder.url("/ping")
    ) + &ping_buyer("second", &second, "");
    let (app, store) = TestApp::spawn_with_store(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(ids(&body), vec!["second"]);
    let record = store
        .get_lead(body["lead_id"].as_str().unwrap())
        .await
        .unwrap()
        .expect("stored");
    let reason = record.auction_log.iter().find_map(|event| match event {
        leadex::storage::AuctionEvent::Post {
            buyer,
            outcome,
            reason,
            ..
        } if buyer == "gone" => Some((outcome.clone(), reason.clone())),
        _ => None,
    });
    let (outcome, reason) = reason.expect("gone's post is in the auction log");
    assert_eq!(outcome, "transport_error");
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("Connection refused"), "{reason}");
    app.stop().await;
}

const OPS_TOKEN: &str = "test-operator-token";

#[actix_web::test]
async fn operators_read_a_leads_auction_log_and_a_suppliers_leads_of_a_day() {
    let refuser = refusing_sim("50");
    let second = sim("40", 0);
    let buyers = ping_buyer("refuser", &refuser, "") + &ping_buyer("second", &second, "");
    let text = config(&data_dir(), "personal_fields = [\"city\"]", &buyers)
        + &format!(
            "\n[ops]\ntoken_sha256 = [\"{}\"]\n",
            leadex::startup::hash_key(OPS_TOKEN)
        );
    let app = TestApp::spawn(&text).await;
    let mut sent = lead();
    sent["address"] = json!("1 Main St");
    sent["city"] = json!("Austin");
    sent["homeowner"] = json!("yes");
    let (_, body) = app.post_lead(&sent).await;
    assert_eq!(body["status"], "sold", "{body}");
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    let (status, view) = app.get_ops_lead(Some(OPS_TOKEN), &lead_id).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["lead_id"], lead_id.as_str());
    assert_eq!(view["supplier_id"], "sup-1");
    assert_eq!(view["campaign"], "acme-auto");
    assert_eq!(view["status"], "sold");
    assert_eq!(view["price"], json!(40.0));
    assert_eq!(view["buyer_ids"], json!(["second"]));
    // Every ping with its bid, and both posts: the refusal, then the sale to the next bid.
    let log = view["auction_log"].as_array().unwrap();
    let event = |kind: &str, buyer: &str| {
        log.iter()
            .find(|e| e["event"] == kind && e["buyer"] == buyer)
            .unwrap_or_else(|| panic!("no {kind} of {buyer} in {view}"))
            .clone()
    };
    assert_eq!(event("ping", "refuser")["bid_cents"], 5000);
    assert_eq!(event("ping", "second")["bid_cents"], 4000);
    assert_eq!(event("post", "refuser")["outcome"], "rejected");
    assert_eq!(event("post", "second")["outcome"], "accepted");
    assert_eq!(log.len(), 4, "{view}");
    let fields = view["fields"].as_object().unwrap();
    for personal in ["firstName", "lastName", "email", "phone", "address", "city"] {
        assert!(!fields.contains_key(personal), "{personal} in {view}");
    }
    assert_eq!(fields["state"], "TX");
    assert_eq!(fields["homeowner"], "yes");

    // A supplier's key is not an operator token; no token, no view; an unknown lead is a 404.
    for token in [Some(KEY), None] {
        let (status, error) = app.get_ops_lead(token, &lead_id).await;
        assert_eq!(
            (status, error["error"].as_str()),
            (401, Some("Invalid API Key"))
        );
    }
    let (status, error) = app
        .get_ops_lead(Some(OPS_TOKEN), "01KNOSUCHLEAD0000000000000")
        .await;
    assert_eq!((status, error["error"].as_str()), (404, Some("Not found")));

    // The supplier's leads of the day, a page at a time, oldest first.
    let (_, second_lead) = app.post_lead(&lead()).await;
    let day = &view["created_at"].as_str().unwrap()[..10];
    let running = &app;
    let list = |query: String| async move {
        running
            .get_ops(
                Some(OPS_TOKEN),
                &format!("/ops/suppliers/sup-1/leads?{query}"),
            )
            .await
    };
    let mut listed = Vec::new();
    let mut after = String::new();
    for _ in 0..3 {
        let (status, page) = list(format!("day={day}&limit=1&after={after}")).await;
        assert_eq!(status, 200, "{page}");
        let leads = page["leads"].as_array().unwrap();
        listed.extend(
            leads
                .iter()
                .map(|l| l["lead_id"].as_str().unwrap().to_owned()),
        );
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(
        listed,
        [lead_id.as_str(), second_lead["lead_id"].as_str().unwrap()]
    );
    let (_, page) = list(format!("day={day}")).await;
    assert_eq!(page["leads"][0]["status"], "sold");
    assert_eq!(page["leads"][0]["price"], json!(40.0));
    assert_eq!(page["leads"][0]["campaign"], "acme-auto");
    assert!(page.get("next_after").is_none(), "{page}");
    let (status, page) = list("day=2026-13-01&limit=0".into()).await;
    assert_eq!(
        (status, &page["fields"]),
        (400, &json!(["day", "limit"])),
        "{page}"
    );
    let (status, page) = list("limit=5".into()).await;
    assert_eq!(
        (status, page["error"].as_str()),
        (400, Some("Missing required field"))
    );
    let (status, _) = app
        .get_ops(
            Some(OPS_TOKEN),
            &format!("/ops/suppliers/nobody/leads?day={day}"),
        )
        .await;
    assert_eq!(status, 404);
    app.stop().await;

    // Without `[ops]` the route is off.
    let app = TestApp::spawn(&config(&data_dir(), "", &buyers)).await;
    let (_, body) = app.post_lead(&lead()).await;
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    let (status, _) = app.get_ops_lead(Some(OPS_TOKEN), &lead_id).await;
    assert_eq!(status, 404);
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

// ---- The supplier API to the letter (CONTRACT §2) ----

async fn raw(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = app.client.request(method, app.url(path)).body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn error_of(text: &str) -> (String, Option<Value>) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(v["success"], false, "{text}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    (
        v["error"].as_str().unwrap().to_owned(),
        v.get("fields").cloned(),
    )
}

#[actix_web::test]
async fn every_error_case_has_the_contract_shape() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config(
        &data_dir(),
        "required_fields = [\"email\", \"zip\"]",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    let json_ct = Some("application/json");
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut l = lead();
        edit(&mut l);
        serde_json::to_vec(&l).unwrap()
    };
    let big = {
        let mut l = lead();
        l["notes"] = json!("x".repeat(64 * 1024));
        serde_json::to_vec(&l).unwrap()
    };
    // (case, content type, body, status, error name, fields)
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Vec<u8>,
        u16,
        &'a str,
        Option<Value>,
    );
    let cases: Vec<Case> = vec![
        (
            "bad JSON",
            json_ct,
            b"{\"seller\": ".to_vec(),
            400,
            "Invalid request body",
            None,
        ),
        (
            "JSON array",
            json_ct,
            b"[1, 2]".to_vec(),
            400,
            "Invalid request body",
            None,
        ),
        (
            "JSON string",
            json_ct,
            b"\"lead\"".to_vec(),
            400,
            "Invalid request body",
            None,
        ),
        (
            "not UTF-8",
            json_ct,
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            400,
            "Invalid request body",
            None,
        ),
        (
            "unsupported type",
            Some("text/xml"),
            b"<lead/>".to_vec(),
            400,
            "Invalid request body",
            None,
        ),
        ("too large", json_ct, big, 413, "Payload too large", None),
        (
            "missing seller",
            json_ct,
            with(&|l| {
                l.as_object_mut().unwrap().remove("seller");
            }),
            400,
            "Missing required field",
            Some(json!(["seller"])),
        ),
        (
            "blank category and bad phone",
            json_ct,
            with(&|l| {
                l["category"] = json!("");
                l["phone"] = json!("555-1234");
            }),
            400,
            "Missing required field",
            Some(json!(["category", "phone"])),
        ),
        (
            "campaign's own required fields",
            json_ct,
            with(&|l| {
                l.as_object_mut().unwrap().remove("email");
                l.as_object_mut().unwrap().remove("zip");
            }),
            400,
            "Missing required field",
            Some(json!(["email", "zip"])),
        ),
        (
            "every invalid field",
            json_ct,
            with(&|l| {
                l["phone"] = json!("555-1234");
                l["state"] = json!("XX");
                l["email"] = json!("nope");
                l["zip"] = json!("7500");
            }),
            400,
            "Invalid field",
            Some(json!(["phone", "state", "email", "zip"])),
        ),
        (
            "phone with letters",
            json_ct,
            with(&|l| {
                l["phone"] = json!("555-123-45AB");
            }),
            400,
            "Invalid field",
            Some(json!(["phone"])),
        ),
        (
            "eleven digits not starting with 1",
            json_ct,
            with(&|l| {
                l["phone"] = json!("25551234567");
            }),
            400,
            "Invalid field",
            Some(json!(["phone"])),
        ),
        (
            "object as a name",
            json_ct,
            with(&|l| {
                l["firstName"] = json!({"a": 1});
            }),
            400,
            "Invalid field",
            Some(json!(["firstName"])),
        ),
        (
            "unknown category",
            json_ct,
            with(&|l| {
                l["category"] = json!("Pet Insurance");
            }),
            400,
            "No matching campaign",
            None,
        ),
        (
            "seller not granted",
            json_ct,
            with(&|l| {
                l["seller"] = json!("OTHR0001");
            }),
            401,
            "Invalid API Key",
            None,
        ),
    ];
    for (name, content_type, body, status, error, fields) in cases {
        let (got, headers, text) = raw(
            &app,
            reqwest::Method::POST,
            "/api/leads",
            Some(KEY),
            content_type,
            body,
        )
        .await;
        assert_eq!(got, status, "{name}: {text}");
        let (got_error, got_fields) = error_of(&text);
        assert_eq!(got_error, error, "{name}: {text}");
        assert_eq!(got_fields, fields, "{name}: {text}");
        assert!(headers.contains_key("x-request-id"), "{name}");
        if status != 413 {
            assert!(
                headers.contains_key("x-ratelimit-remaining"),
                "{name}: every answer to a valid key has the headers"
            );
        }
    }
    assert_eq!(buyer.stats.pings(), 0, "no refused lead reached a buyer");

    // Routes and methods.
    let (status, headers, text) =
        raw(&app, reqwest::Method::GET, "/nope", None, None, vec![]).await;
    assert_eq!((status, error_of(&text).0.as_str()), (404, "Not found"));
    assert!(headers.contains_key("x-request-id"));
    let (status, get_headers, text) = raw(
        &app,
        reqwest::Method::GET,
        "/api/leads",
        Some(KEY),
        None,
        vec![],
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (405, "Method not allowed")
    );
    let (status, delete_headers, text) = raw(
        &app,
        reqwest::Method::DELETE,
        "/api/leads/abc",
        Some(KEY),
        None,
        vec![],
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (405, "Method not allowed")
    );
    // A wrong method with a valid key is a request like any other: counted, with the headers.
    let remaining = |h: &reqwest::header::HeaderMap| -> u64 {
        h["x-ratelimit-remaining"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(remaining(&get_headers), remaining(&delete_headers) + 1);
    // Without a valid key it is a bad key first, as on the routes' own methods.
    let (status, _, text) = raw(
        &app,
        reqwest::Method::PUT,
        "/api/leads",
        Some("wrong-key"),
        None,
        vec![],
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (401, "Invalid API Key")
    );
    app.stop().await;
}

#[actix_web::test]
async fn checks_run_in_the_contract_order() {
    let buyer = sim("10", 0);
    let data = data_dir();
    let app = TestApp::spawn(&config_with(
        &data,
        "requests = 2\nwindow_secs = 60",
        "",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    // Bad key beats a bad body.
    let (status, _, _) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some("nope"),
        Some("application/json"),
        b"{".to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    // Body parsing beats seller/campaign and fields.
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some(KEY),
        Some("application/json"),
        b"{".to_vec(),
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (400, "Invalid request body")
    );
    // Seller and campaign beat missing fields.
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some(KEY),
        Some("application/json"),
        br#"{"seller":"ACME1234","category":"Boats"}"#.to_vec(),
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (400, "No matching campaign")
    );
    // The rate limit beats the body: two requests counted above, the third is refused.
    let (status, headers, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some(KEY),
        Some("application/json"),
        b"{".to_vec(),
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (429, "Rate limit exceeded")
    );
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    app.stop().await;
}

#[actix_web::test]
async fn fields_come_from_query_json_and_forms_and_sellers_match_by_code_or_slug() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config(&data_dir(), "", &ping_buyer("a", &buyer, ""))).await;

    // The supplier document's query example, with a dialable phone.
    let path = "/api/leads?seller=ACME1234&category=Auto%20Insurance&state=TX&firstName=John&lastName=Doe&phone=555-123-4567&homeowner=yes";
    let (status, _, text) = raw(&app, reqwest::Method::POST, path, Some(KEY), None, vec![]).await;
    assert_eq!(status, 200, "query only: {text}");
    // Its 7-digit phone is refused as invalid, as CONTRACT §2 says.
    let (status, _, text) = raw(&app, reqwest::Method::POST, "/api/leads?seller=ACME1234&category=Solar&state=TX&firstName=John&lastName=Doe&phone=555-1234", Some(KEY), None, vec![]).await;
    assert_eq!(
        (status, error_of(&text)),
        (400, ("Invalid field".to_owned(), Some(json!(["phone"]))))
    );

    // The body wins over the query.
    let path = "/api/leads?state=CA&firstName=Query&extra=from-query";
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        path,
        Some(KEY),
        Some("application/json"),
        serde_json::to_vec(&lead()).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Form body, slug seller, lower-case category.
    let form = "seller=acme&category=auto+insurance&firstName=Ann&lastName=Lee&phone=%2B1+(555)+987-6543&state=ny&creditScore=720";
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some(KEY),
        Some("application/x-www-form-urlencoded"),
        form.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // Lower-case seller code.
    let mut l = lead();
    l["seller"] = json!("acme1234");
    let (status, body) = app.post_lead(&l).await;
    assert_eq!(status, 200, "{body}");

    // Text that is not UTF-8 once decoded is bad encoding, in a form body as in the query
    // (Latin-1 from an old form), not a name with a replacement character in it.
    let form = "seller=acme&category=auto+insurance&firstName=Jos%E9&lastName=Lee&phone=5559876543&state=ny";
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads",
        Some(KEY),
        Some("application/x-www-form-urlencoded"),
        form.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (400, "Invalid request body"),
        "{text}"
    );
    assert!(text.contains("firstName"), "{text}");
    let (status, _, text) = raw(
        &app,
        reqwest::Method::POST,
        "/api/leads?city=%FF",
        Some(KEY),
        Some("application/json"),
        serde_json::to_vec(&lead()).unwrap(),
    )
    .await;
    assert_eq!(
        (status, error_of(&text).0.as_str()),
        (400, "Invalid request body"),
        "{text}"
    );
    // A zip of ten bytes with a character across its fifth is an invalid field (it used to
    // panic the handler); a phone written with en dashes is a phone.
    let mut l = lead();
    l["zip"] = json!("1234\u{20AC}123");
    let (status, body) = app.post_lead(&l).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "Invalid field");
    assert_eq!(body["fields"], json!(["zip"]));
    let mut l = lead();
    l["phone"] = json!("555\u{2013}123\u{2013}4567");
    l["homeowner"] = json!("dash");
    let (status, body) = app.post_lead(&l).await;
    assert_eq!(status, 200, "{body}");

    let posts = buyer.stats.post_bodies();
    assert_eq!(posts.len(), 5);
    assert_eq!(posts[4]["lead"]["homeowner"], "dash");
    assert_eq!(posts[4]["lead"]["phone"], "5551234567");
    assert_eq!(
        posts[0]["lead"]["homeowner"], "yes",
        "unknown query field reaches the buyer"
    );
    assert_eq!(posts[1]["lead"]["state"], "TX", "body beats query");
    assert_eq!(posts[1]["lead"]["firstName"], "John");
    assert_eq!(
        posts[1]["lead"]["extra"], "from-query",
        "query fields not in the body are kept"
    );
    assert_eq!(posts[2]["lead"]["phone"], "5559876543");
    assert_eq!(posts[2]["lead"]["state"], "NY");
    assert_eq!(
        posts[2]["lead"]["creditScore"], "720",
        "form values pass on as sent"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_required_field_the_exchange_does_not_know_is_passed_on_as_sent() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config(
        &data_dir(),
        "required_fields = [\"homeowner\"]",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    let mut l = lead();
    l["homeowner"] = json!(true);
    let (status, body) = app.post_lead(&l).await;
    assert_eq!(status, 200, "{body}");
    l["homeowner"] = json!("  ");
    let (status, body) = app.post_lead(&l).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "Missing required field");
    assert_eq!(body["fields"], json!(["homeowner"]));
    let posts = buyer.stats.post_bodies();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0]["lead"]["homeowner"], json!(true));
    app.stop().await;
}

#[actix_web::test]
async fn a_supplier_limit_without_its_own_window_takes_the_global_one() {
    let buyer = sim("10", 0);
    let text = config_with(
        &data_dir(),
        "requests = 100\nwindow_secs = 10",
        "",
        &ping_buyer("a", &buyer, ""),
    )
    .replacen(
        "id = \"sup-1\"\n",
        "id = \"sup-1\"\nrate_limit = { requests = 2 }\n",
        1,
    );
    let app = TestApp::spawn(&text).await;
    let now = leadex::clock::now_ms() / 1000;
    let (status, headers, _) = app.post_lead_as(KEY, &lead()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-limit"], "2");
    let reset: i64 = headers["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (now + 9..=now + 12).contains(&reset),
        "the global 10 s window: reset {reset} vs now {now}"
    );
    app.post_lead_as(KEY, &lead()).await;
    let (status, _, _) = app.post_lead_as(KEY, &lead()).await;
    assert_eq!(status, 429);
    app.stop().await;
}

#[actix_web::test]
async fn rate_limit_headers_count_every_answer_to_a_valid_key() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config_with(
        &data_dir(),
        "requests = 3\nwindow_secs = 60",
        "",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    let now = leadex::clock::now_ms() / 1000;
    let (status, h1, body) = app.post_lead_as(KEY, &lead()).await;
    assert_eq!(status, 200);
    assert_eq!(h1["x-ratelimit-limit"], "3");
    assert_eq!(h1["x-ratelimit-remaining"], "2");
    let reset: i64 = h1["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!(
        (now + 59..=now + 62).contains(&reset),
        "reset {reset} vs now {now}"
    );
    // A 400 counts too, and so does a status read.
    let (status, h2, _) = app.post_lead_as(KEY, &json!({"seller": "ACME1234"})).await;
    assert_eq!(
        (status, h2["x-ratelimit-remaining"].to_str().unwrap()),
        (400, "1")
    );
    let response = app
        .client
        .get(app.url(&format!("/api/leads/{}", body["lead_id"].as_str().unwrap())))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
    // Over the limit: 429, not counted, same reset.
    for _ in 0..2 {
        let (status, h, body) = app.post_lead_as(KEY, &lead()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (429, Some("Rate limit exceeded"))
        );
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(
            h["x-ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
            reset
        );
        let retry: i64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((57..=61).contains(&retry), "retry-after {retry}");
    }
    // Another supplier's key has its own window.
    let mut other = lead();
    other["seller"] = json!("OTHR0001");
    let (status, h, _) = app.post_lead_as(OTHER_KEY, &other).await;
    assert_eq!(
        (status, h["x-ratelimit-remaining"].to_str().unwrap()),
        (400, "2"),
        "no campaign for OTHR0001, but counted in its own window"
    );
    assert_eq!(buyer.stats.posts(), 1);
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("leadex_rate_limited_total") && !l.ends_with(" 0")),
        "429s are counted"
    );
    app.stop().await;
}

#[actix_web::test]
async fn failed_authentication_is_limited_per_address() {
    let buyer = sim("10", 0);
    let app = TestApp::spawn(&config_with(
        &data_dir(),
        "requests = 100\nauth_failures = 3\nauth_failure_window_secs = 60",
        "",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    for i in 0..3 {
        let (status, _, _) = app.post_lead_as(&format!("guess-{i}"), &lead()).await;
        assert_eq!(status, 401);
    }
    let (status, headers, body) = app.post_lead_as("guess-4", &lead()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("Rate limit exceeded"))
    );
    assert!(headers.contains_key("retry-after"));
    // While the address is blocked even the right key is refused, so a lucky guess is not told apart.
    let (status, _, _) = app.post_lead_as(KEY, &lead()).await;
    assert_eq!(status, 429);
    assert_eq!(buyer.stats.pings(), 0);
    app.stop().await;
}

#[actix_web::test]
async fn idempotency_key_replays_the_first_answer() {
    let buyer = sim("10-40", 30);
    let data = data_dir();
    let text = config(&data, "", &ping_buyer("a", &buyer, ""));
    let app = TestApp::spawn(&text).await;
    let send = |key: &'static str, body: Value| {
        let request = app
            .client
            .post(app.url("/api/leads"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    // A refused request is not remembered: the corrected retry with the same key goes through.
    let (status, _) = send("order-1", json!({"seller": "ACME1234"})).await;
    assert_eq!(status, 400);
    let (status, first) = send("order-1", lead()).await;
    assert_eq!(status, 200);
    let (status, again) = send("order-1", lead()).await;
    assert_eq!((status, &again), (200, &first), "same answer, same lead_id");
    assert_eq!(buyer.stats.pings(), 1, "no second auction");

    // Concurrent requests with one key run one auction and all get its answer.
    let answers = futures::future::join_all((0..5).map(|_| send("order-2", lead()))).await;
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert_eq!(buyer.stats.pings(), 2);
    assert_eq!(buyer.stats.posts(), 2);
    // Another key is another lead.
    let (_, other) = send("order-3", lead()).await;
    assert_ne!(other, first);
    // The same lead again, its fields in another order and written differently: a repeat.
    let mut reordered = serde_json::Map::new();
    for (name, value) in lead().as_object().unwrap().iter().rev() {
        reordered.insert(name.clone(), value.clone());
    }
    reordered.insert("phone".into(), json!("+1 (555) 123-4567"));
    reordered.insert("state".into(), json!("tx"));
    // A field the exchange does not know may change between a request and its retry.
    reordered.insert("attempt".into(), json!(2));
    reordered.insert("seller".into(), json!("acme1234"));
    let (status, again) = send("order-1", Value::Object(reordered)).await;
    assert_eq!((status, &again), (200, &first));
    // The key reused for another person is refused, not answered with the first lead's id:
    // that lead would be neither auctioned nor stored.
    let pings = buyer.stats.pings();
    let mut someone_else = lead();
    someone_else["phone"] = json!("555-987-6543");
    let (status, refused) = send("order-1", someone_else).await;
    assert_eq!(status, 400, "{refused}");
    let (error, _) = error_of(&refused);
    assert_eq!(error, "Invalid request body");
    let first_id = serde_json::from_str::<Value>(&first).unwrap()["lead_id"].clone();
    assert!(refused.contains(first_id.as_str().unwrap()), "{refused}");
    assert_eq!(buyer.stats.pings(), pings, "no auction for the refused one");
    app.stop().await;

    // Keys survive a restart.
    let app = TestApp::spawn(&text).await;
    let response = app
        .client
        .post(app.url("/api/leads"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "order-1")
        .json(&lead())
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), first);
    assert_eq!(buyer.stats.pings(), 3);
    app.stop().await;
}

#[actix_web::test]
async fn a_connection_reset_mid_auction_keeps_the_idempotency_key_until_the_lead_is_stored() {
    use tokio::io::AsyncWriteExt;
    let buyer = sim_with(Behaviour {
        bid: BidSpec::parse("30").unwrap(),
        post_latency_ms: (400, 400),
        ..Behaviour::default()
    });
    let app = TestApp::spawn(&config(&data_dir(), "", &ping_buyer("a", &buyer, ""))).await;
    let body = serde_json::to_vec(&lead()).unwrap();
    let head = format!(
        "POST /api/leads HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nIdempotency-Key: reset-1\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        body.len()
    );
    let mut supplier = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    supplier.write_all(head.as_bytes()).await.unwrap();
    supplier.write_all(&body).await.unwrap();
    // Once the buyer has been pinged the auction is under way; the supplier's side then resets
    // the connection (an RST, which makes the server drop the request).
    let deadline = Instant::now() + Duration::from_secs(5);
    while buyer.stats.pings() == 0 {
        assert!(Instant::now() < deadline, "the buyer was never pinged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    supplier.set_zero_linger().unwrap();
    drop(supplier);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The supplier sends it again at once with the same key: it waits for the first auction
    // and gets its answer; the lead is not auctioned, and sold, twice.
    let response = app
        .client
        .post(app.url("/api/leads"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "reset-1")
        .json(&lead())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "sold", "{answer}");
    assert_eq!((buyer.stats.pings(), buyer.stats.posts()), (1, 1));
    assert_eq!(
        buyer.stats.post_bodies()[0]["lead_id"],
        answer["lead_id"],
        "the answer is the first auction's"
    );
    app.stop().await;
}

/// Validates `body` against the OpenAPI document's schema for (path, method, status).
fn check_against_openapi(doc: &Value, path: &str, method: &str, status: u16, body: &str) {
    let errors = openapi_errors(doc, path, method, status, body);
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: {body} does not match the document: {errors:?}"
    );
}

fn openapi_errors(doc: &Value, path: &str, method: &str, status: u16, body: &str) -> Vec<String> {
    let responses = &doc["paths"][path][method]["responses"];
    let mut response = responses
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{method} {path} {status} is not documented: {body}"));
    if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap();
        response = &doc["components"]["responses"][name];
    }
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    let root = json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"], "allOf": [schema]});
    let validator = jsonschema::draft202012::new(&root).expect("schema compiles");
    let instance: Value = serde_json::from_str(body).unwrap();
    validator
        .iter_errors(&instance)
        .map(|e| e.to_string())
        .collect()
}

#[actix_web::test]
async fn real_answers_match_the_openapi_document() {
    let (bidder, refuser) = (sim("12.5", 1), sim("none", 0));
    let buyers = ping_buyer("a", &bidder, "") + &ping_buyer("b", &refuser, "");
    let app = TestApp::spawn(&config_with(&data_dir(), "requests = 12", "", &buyers)).await;
    let (status, _, served) = raw(
        &app,
        reqwest::Method::GET,
        "/api/openapi.json",
        None,
        None,
        vec![],
    )
    .await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(leadex::http::OPENAPI).unwrap()
    );
    assert_eq!(doc["openapi"], "3.1.0");
    // The check has teeth: a sold answer without its price, or an unknown error name, fails.
    assert!(
        !openapi_errors(
            &doc,
            "/api/leads",
            "post",
            200,
            r#"{"success":true,"lead_id":"x","status":"sold","buyer_ids":["a"]}"#
        )
        .is_empty()
    );
    assert!(
        !openapi_errors(
            &doc,
            "/api/leads",
            "post",
            400,
            r#"{"success":false,"error":"Oops","message":"m"}"#
        )
        .is_empty()
    );

    let post = "/api/leads";
    let json_ct = Some("application/json");
    let mut seen = Vec::new();
    let mut check = |status: u16, path: &str, method: &str, body: &str| {
        check_against_openapi(&doc, path, method, status, body);
        seen.push((method.to_owned(), status));
    };
    let (s, _, b) = raw(
        &app,
        reqwest::Method::POST,
        post,
        Some(KEY),
        json_ct,
        serde_json::to_vec(&lead()).unwrap(),
    )
    .await;
    check(s, post, "post", &b);
    let lead_id = serde_json::from_str::<Value>(&b).unwrap()["lead_id"]
        .as_str()
        .unwrap()
        .to_owned();
    bidder.set_behaviour(Behaviour {
        bid: BidSpec::Nothing,
        ..Behaviour::default()
    });
    let (s, _, b) = raw(
        &app,
        reqwest::Method::POST,
        post,
        Some(KEY),
        json_ct,
        serde_json::to_vec(&lead()).unwrap(),
    )
    .await;
    assert!(b.contains("pending"));
    check(s, post, "post", &b);
    let pending_id = serde_json::from_str::<Value>(&b).unwrap()["lead_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for body in [
        b"{".to_vec(),
        br#"{"seller":"ACME1234"}"#.to_vec(),
        br#"{"seller":"ACME1234","category":"Boats"}"#.to_vec(),
    ] {
        let (s, _, b) = raw(&app, reqwest::Method::POST, post, Some(KEY), json_ct, body).await;
        check(s, post, "post", &b);
    }
    let (s, _, b) = raw(
        &app,
        reqwest::Method::POST,
        post,
        Some(KEY),
        json_ct,
        vec![b' '; 70_000],
    )
    .await;
    check(s, post, "post", &b);
    let (s, _, b) = raw(
        &app,
        reqwest::Method::POST,
        post,
        Some("wrong"),
        json_ct,
        vec![],
    )
    .await;
    check(s, post, "post", &b);
    for id in [&lead_id, &pending_id, &"01NOPE".to_owned()] {
        let path = format!("/api/leads/{id}");
        let (s, _, b) = raw(&app, reqwest::Method::GET, &path, Some(KEY), None, vec![]).await;
        check(s, "/api/leads/{lead_id}", "get", &b);
    }
    let (s, _, b) = raw(
        &app,
        reqwest::Method::GET,
        &format!("/api/leads/{lead_id}"),
        Some(OTHER_KEY),
        None,
        vec![],
    )
    .await;
    check(s, "/api/leads/{lead_id}", "get", &b);
    for _ in 0..40 {
        let (s, _, b) = raw(
            &app,
            reqwest::Method::POST,
            post,
            Some(KEY),
            json_ct,
            b"{}".to_vec(),
        )
        .await;
        check(s, post, "post", &b);
        if s == 429 {
            break;
        }
        assert!(b.len() < 100_000);
    }
    for wanted in [
        ("post", 200),
        ("post", 400),
        ("post", 401),
        ("post", 413),
        ("post", 429),
        ("get", 200),
        ("get", 404),
    ] {
        assert!(
            seen.iter().any(|(m, s)| m == wanted.0 && *s == wanted.1),
            "never saw {wanted:?}"
        );
    }
    app.stop().await;
}

#[test]
fn openapi_error_names_are_the_code_s() {
    use leadex::http::ApiError;
    let doc: Value = serde_json::from_str(leadex::http::OPENAPI).unwrap();
    let documented: Vec<&str> =
        doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
    let errors = [
        ApiError::InvalidApiKey,
        ApiError::RateLimited {
            retry_after_secs: 1,
        },
        ApiError::InvalidBody(String::new()),
        ApiError::PayloadTooLarge(1),
        ApiError::NoMatchingCampaign,
        ApiError::MissingFields {
            missing: vec![],
            invalid: vec![],
        },
        ApiError::InvalidFields(vec![]),
        ApiError::Duplicate,
        ApiError::NotFound,
        ApiError::MethodNotAllowed,
        ApiError::Overloaded {
            retry_after_secs: 1,
        },
        ApiError::StorageUnavailable(String::new()),
        ApiError::Internal(String::new()),
    ];
    for e in &errors {
        assert!(
            documented.contains(&e.name()),
            "{} is not in the document",
            e.name()
        );
    }
    for name in documented {
        assert!(
            errors.iter().any(|e| e.name() == name),
            "{name} is documented but never answered"
        );
    }
}

#[actix_web::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    let buyer = sim("10", 0);
    let limits = "requests = 100\nauth_failures = 2\nauth_failure_window_secs = 60";
    let behind_proxy = config_with(&data_dir(), limits, "", &ping_buyer("a", &buyer, "")).replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let app = TestApp::spawn(&behind_proxy).await;
    let attempt = |forwarded: &'static str, key: &'static str| {
        let request = app
            .client
            .post(app.url("/api/leads"))
            .bearer_auth(key)
            .header("X-Forwarded-For", forwarded)
            .json(&lead());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(attempt("203.0.113.5", "guess-1").await, 401);
    assert_eq!(attempt("203.0.113.5", "guess-2").await, 401);
    assert_eq!(
        attempt("203.0.113.5", "guess-3").await,
        429,
        "that client is blocked"
    );
    assert_eq!(
        attempt("198.51.100.7, 127.0.0.9", KEY).await,
        200,
        "another client behind the same proxy is not"
    );
    app.stop().await;

    // Without trusted proxies the header is ignored: a forger cannot spread guesses over
    // made-up addresses.
    let direct = config_with(&data_dir(), limits, "", &ping_buyer("a", &buyer, ""));
    let app = TestApp::spawn(&direct).await;
    let attempt = |forwarded: &'static str| {
        let request = app
            .client
            .post(app.url("/api/leads"))
            .bearer_auth("guess")
            .header("X-Forwarded-For", forwarded)
            .json(&lead());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(attempt("203.0.113.1").await, 401);
    assert_eq!(attempt("203.0.113.2").await, 401);
    assert_eq!(attempt("203.0.113.3").await, 429);
    app.stop().await;
}
