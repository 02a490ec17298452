//! The auction's decisions as pure functions: which bids count, in what order buyers are
//! offered the lead, and when the sale is complete. No clock, no I/O: answer times come in.

use std::collections::VecDeque;
use std::time::Duration;

use super::money::Price;

/// A buyer's offer as the auction sees it. `buyer` indexes the campaign's buyer list.
#[derive(Debug, Clone, PartialEq)]
pub struct Bid {
    pub buyer: usize,
    pub price: Price,
    /// Time from the auction's start to the answer; direct-post buyers count as zero.
    pub answered_after: Duration,
    pub direct: bool,
    /// The buyer's own floor; bids under it are dropped.
    pub buyer_floor: Price,
    /// Opaque value the buyer asked to see again in the post, as it sent it (a string, a
    /// number, an object...).
    pub token: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    UnderCampaignFloor,
    UnderBuyerFloor,
    ZeroBid,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnderCampaignFloor => "under_campaign_floor",
            DropReason::UnderBuyerFloor => "under_buyer_floor",
            DropReason::ZeroBid => "zero_bid",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuctionRules {
    pub campaign_floor: Price,
    /// How many buyers may buy the same lead (at least 1).
    pub max_buyers: usize,
}

/// The bids worth offering the lead to, best first, and the ones dropped with why.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    pub ranked: Vec<Bid>,
    pub dropped: Vec<(Bid, DropReason)>,
}

/// Ranks bids: drops zero bids and bids under either floor, then orders by price (highest
/// first), then by answer time (earlier first; direct-post buyers answer at zero), then by
/// the buyer's place in the config so equal inputs always give the same order.
pub fn rank(bids: Vec<Bid>, rules: &AuctionRules) -> Ranking {
    let mut ranked = Vec::with_capacity(bids.len());
    let mut dropped = Vec::new();
    for bid in bids {
        if bid.price.is_zero() {
            dropped.push((bid, DropReason::ZeroBid));
        } else if bid.price < rules.campaign_floor {
            dropped.push((bid, DropReason::UnderCampaignFloor));
        } else if bid.price < bid.buyer_floor {
            dropped.push((bid, DropReason::UnderBuyerFloor));
        } else {
            ranked.push(bid);
        }
    }
    ranked.sort_by(|a, b| {
        b.price
            .cmp(&a.price)
            .then(b.direct.cmp(&a.direct))
            .then(a.answered_after.cmp(&b.answered_after))
            .then(a.buyer.cmp(&b.buyer))
    });
    Ranking { ranked, dropped }
}

/// The post phase: offers the lead to the best bids, a wave at a time, until `max_buyers`
/// accepted or no bid is left. A refusal frees its place for the next best bid.
#[derive(Debug, Clone)]
pub struct PostQueue {
    waiting: VecDeque<Bid>,
    wanted: usize,
    accepted: Vec<Bid>,
    in_flight: usize,
}

impl PostQueue {
    pub fn new(ranking: Ranking, rules: &AuctionRules) -> PostQueue {
        PostQueue {
            waiting: ranking.ranked.into(),
            wanted: rules.max_buyers.max(1),
            accepted: Vec::new(),
            in_flight: 0,
        }
    }

    /// The next bids to post to at once: as many as places are still open.
    pub fn next_wave(&mut self) -> Vec<Bid> {
        let open = self
            .wanted
            .saturating_sub(self.accepted.len() + self.in_flight);
        let take = open.min(self.waiting.len());
        self.in_flight += take;
        self.waiting.drain(..take).collect()
    }

    pub fn accepted(&mut self, bid: Bid) {
        self.in_flight -= 1;
        self.accepted.push(bid);
    }

    pub fn refused(&mut self, _bid: &Bid) {
        self.in_flight -= 1;
    }

    pub fn is_done(&self) -> bool {
        self.in_flight == 0 && (self.accepted.len() >= self.wanted || self.waiting.is_empty())
    }

    /// The bids that were never offered because the sale completed first.
    pub fn unoffered(&self) -> impl Iterator<Item = &Bid> {
        self.waiting.iter()
    }

    /// Accepted bids in rank order, and what the supplier is paid: their sum.
    pub fn into_sale(mut self) -> (Vec<Bid>, Price) {
        self.accepted.sort_by(|a, b| {
            b.price
                .cmp(&a.price)
                .then(a.answered_after.cmp(&b.answered_after))
        });
        let total = self.accepted.iter().map(|b| b.price).sum();
        (self.accepted, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bid(buyer: usize, cents: i64, ms: u64) -> Bid {
        Bid {
            buyer,
            price: Price::from_cents(cents),
            answered_after: Duration::from_millis(ms),
            direct: false,
            buyer_floor: Price::ZERO,
            token: None,
        }
    }

    fn rules(floor: i64, max_buyers: usize) -> AuctionRules {
        AuctionRules {
            campaign_floor: Price::from_cents(floor),
            max_buyers,
        }
    }

    fn order(r: &Ranking) -> Vec<usize> {
        r.ranked.iter().map(|b| b.buyer).collect()
    }

    #[test]
    fn highest_wins_and_ties_go_to_the_earlier_answer() {
        let r = rank(
            vec![
                bid(0, 1000, 50),
                bid(1, 1500, 90),
                bid(2, 1500, 20),
                bid(3, 900, 1),
            ],
            &rules(0, 1),
        );
        assert_eq!(order(&r), vec![2, 1, 0, 3]);
    }

    #[test]
    fn direct_post_wins_ties() {
        let mut direct = bid(1, 1500, 0);
        direct.direct = true;
        let r = rank(vec![bid(0, 1500, 0), direct], &rules(0, 1));
        assert_eq!(order(&r), vec![1, 0]);
    }

    #[test]
    fn floors_and_zero_bids_drop() {
        let mut picky = bid(1, 900, 5);
        picky.buyer_floor = Price::from_cents(1000);
        let r = rank(
            vec![bid(0, 400, 5), picky, bid(2, 0, 5), bid(3, 500, 5)],
            &rules(500, 1),
        );
        assert_eq!(order(&r), vec![3]);
        let reasons: Vec<_> = r.dropped.iter().map(|(b, why)| (b.buyer, *why)).collect();
        assert_eq!(
            reasons,
            vec![
                (0, DropReason::UnderCampaignFloor),
                (1, DropReason::UnderBuyerFloor),
                (2, DropReason::ZeroBid)
            ]
        );
    }

    #[test]
    fn refusal_falls_back_to_the_next_bid() {
        let rules = rules(0, 1);
        let mut queue = PostQueue::new(
            rank(
                vec![bid(0, 3000, 1), bid(1, 2000, 1), bid(2, 1000, 1)],
                &rules,
            ),
            &rules,
        );
        let wave = queue.next_wave();
        assert_eq!(wave.iter().map(|b| b.buyer).collect::<Vec<_>>(), vec![0]);
        queue.refused(&wave[0]);
        assert!(!queue.is_done());
        let wave = queue.next_wave();
        assert_eq!(wave[0].buyer, 1);
        queue.accepted(wave[0].clone());
        assert!(queue.is_done());
        assert!(queue.next_wave().is_empty());
        let (sold, total) = queue.into_sale();
        assert_eq!((sold.len(), total), (1, Price::from_cents(2000)));
    }

    #[test]
    fn multi_sell_posts_top_n_at_once_and_sums_prices() {
        let rules = rules(0, 2);
        let bids = vec![
            bid(0, 1000, 1),
            bid(1, 3000, 1),
            bid(2, 2000, 1),
            bid(3, 500, 1),
        ];
        let mut queue = PostQueue::new(rank(bids, &rules), &rules);
        let wave = queue.next_wave();
        assert_eq!(wave.iter().map(|b| b.buyer).collect::<Vec<_>>(), vec![1, 2]);
        queue.accepted(wave[0].clone());
        queue.refused(&wave[1]);
        let wave = queue.next_wave();
        assert_eq!(wave.iter().map(|b| b.buyer).collect::<Vec<_>>(), vec![0]);
        queue.accepted(wave[0].clone());
        assert!(queue.is_done());
        assert_eq!(queue.unoffered().count(), 1);
        let (sold, total) = queue.into_sale();
        assert_eq!(sold.iter().map(|b| b.buyer).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(total, Price::from_cents(4000));
    }

    #[test]
    fn nothing_to_sell_is_done_at_once() {
        let rules = rules(0, 1);
        let mut queue = PostQueue::new(rank(vec![], &rules), &rules);
        assert!(queue.next_wave().is_empty());
        assert!(queue.is_done());
        assert_eq!(queue.into_sale().1, Price::ZERO);
    }
}
