// The rate limit as a supplier meets it: one key sends LIMIT + EXTRA leads back to back.
// Every answer carries X-RateLimit-Limit/Remaining/Reset; Remaining counts down; once the
// window is full every answer is 429 `Rate limit exceeded` with Retry-After; no more than
// LIMIT requests get through. Use a key no other test uses (its window must start empty for
// the countdown check), and LIMIT equal to that key's configured limit.
//   k6 run -e API_KEY=k1 -e LIMIT=60 load-tests/k6/ratelimit.js
// With WAIT_FOR_RESET=1 it then sleeps Retry-After (at most 61 s) and checks the key is
// allowed again.
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { KEYS, requireKeys, submit } from './lib.js';

const LIMIT = Number(__ENV.LIMIT || 60);
const EXTRA = Number(__ENV.EXTRA || 20);
const allowed = new Counter('ratelimit_allowed');
const limited = new Counter('ratelimit_refused');

export const options = {
  scenarios: {
    burst: { executor: 'per-vu-iterations', vus: 1, iterations: 1, maxDuration: '3m' },
  },
  thresholds: {
    checks: ['rate==1.0'],
    ratelimit_allowed: [`count<=${LIMIT}`],
    ratelimit_refused: [`count>=${EXTRA}`],
  },
};

export function setup() {
  requireKeys();
}

function header(res, name) {
  // k6 canonicalises header names (X-Ratelimit-Limit).
  const found = Object.keys(res.headers).find((h) => h.toLowerCase() === name.toLowerCase());
  return found === undefined ? undefined : res.headers[found];
}

export default function () {
  const key = KEYS[0];
  let lastRemaining = LIMIT;
  let sawRefusal = false;
  let retryAfter = 1;
  for (let i = 0; i < LIMIT + EXTRA; i += 1) {
    const res = submit(http, key, { scenario: 'ratelimit' });
    const limit = Number(header(res, 'X-RateLimit-Limit'));
    const remaining = Number(header(res, 'X-RateLimit-Remaining'));
    const reset = Number(header(res, 'X-RateLimit-Reset'));
    const now = Math.floor(Date.now() / 1000);
    check(res, {
      'X-RateLimit-Limit is the configured limit': () => limit === LIMIT,
      'X-RateLimit-Remaining present': () => Number.isInteger(remaining) && remaining >= 0,
      'X-RateLimit-Reset is a Unix time within the window': () =>
        Number.isInteger(reset) && reset >= now - 1 && reset <= now + 3600,
    });
    if (res.status === 429) {
      sawRefusal = true;
      limited.add(1);
      retryAfter = Number(header(res, 'Retry-After'));
      let body = {};
      try {
        body = res.json();
      } catch (e) {
        body = {};
      }
      check(res, {
        '429 says Rate limit exceeded': () =>
          body.success === false && body.error === 'Rate limit exceeded',
        '429 carries Retry-After >= 1': () => Number.isInteger(retryAfter) && retryAfter >= 1,
        '429 has Remaining 0': () => remaining === 0,
      });
    } else {
      allowed.add(1);
      check(res, {
        'nothing gets through after the first 429': () => !sawRefusal,
        'Remaining counts down by one': () => remaining === lastRemaining - 1,
      });
      lastRemaining = remaining;
    }
  }
  check(null, { 'the burst was refused at some point': () => sawRefusal });
  if (__ENV.WAIT_FOR_RESET === '1' && sawRefusal) {
    sleep(Math.min(retryAfter, 61));
    const res = submit(http, key, { scenario: 'ratelimit' });
    check(res, { 'allowed again after Retry-After': (r) => r.status !== 429 });
  }
}
