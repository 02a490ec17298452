// Shared by the k6 scripts: where the exchange is, which keys to use, and plausible leads.
// Everything comes from environment variables (k6 run -e NAME=value) with compose defaults.

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
export const SELLER = __ENV.SELLER || 'ACME1234';
export const CATEGORY = __ENV.CATEGORY || 'Auto Insurance';
// The campaign's ping deadline; latency thresholds are this plus 50 ms.
export const DEADLINE_MS = Number(__ENV.DEADLINE_MS || 300);

// Comma-separated supplier API keys, used round-robin so no single key's limit caps the load.
export const KEYS = (__ENV.API_KEYS || __ENV.API_KEY || '')
  .split(',')
  .map((k) => k.trim())
  .filter((k) => k.length > 0);

export function requireKeys() {
  if (KEYS.length === 0) {
    throw new Error('set API_KEYS (comma-separated supplier keys) or API_KEY');
  }
}

export function keyFor(vu, iter) {
  return KEYS[(vu * 7919 + iter) % KEYS.length];
}

const FIRST = ['John', 'Maria', 'Wei', 'Aisha', 'Carlos', 'Emma', 'Noah', 'Priya'];
const LAST = ['Doe', 'Garcia', 'Chen', 'Khan', 'Lopez', 'Smith', 'Brown', 'Patel'];
const STATES = [['TX', '75001'], ['CA', '90210'], ['FL', '33101'], ['NY', '10001'], ['IL', '60601']];

function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

function digits(n) {
  let out = '';
  for (let i = 0; i < n; i += 1) {
    out += Math.floor(Math.random() * 10);
  }
  return out;
}

// A valid lead with made-up personal data (unique phone and email, so dedupe rules pass).
export function lead() {
  const [state, zip] = pick(STATES);
  const first = pick(FIRST);
  const last = pick(LAST);
  return JSON.stringify({
    seller: SELLER,
    category: CATEGORY,
    firstName: first,
    lastName: last,
    email: `${first.toLowerCase()}.${last.toLowerCase()}.${digits(8)}@example.com`,
    phone: `(${200 + Math.floor(Math.random() * 700)}) ${200 + Math.floor(Math.random() * 700)}-${digits(4)}`,
    state,
    zip,
    homeowner: Math.random() < 0.6 ? 'yes' : 'no',
    creditScore: 550 + Math.floor(Math.random() * 270),
  });
}

export function submit(http, key, tags) {
  return http.post(`${BASE_URL}/api/leads`, lead(), {
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${key}` },
    tags,
    timeout: '10s',
  });
}

// A 200 with a sold or pending body, as the supplier document shows it.
export function answeredLead(res) {
  if (res.status !== 200) {
    return false;
  }
  try {
    const body = res.json();
    return body.success === true && (body.status === 'sold' || body.status === 'pending');
  } catch (e) {
    return false;
  }
}
