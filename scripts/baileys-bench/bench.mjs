#!/usr/bin/env node
// The Baileys column of `scripts/bench`: N Baileys 7 sockets in one Node process against wa-sim (the project's
// fake WhatsApp server, running in its own process), measured the way the wakeeper host is measured.
//
// Two phases, each its own process (so the restore starts cold, like a restarted host):
//
//   prime    mints N paired devices on the simulator (POST /v1/devices), turns each engine device record into
//            Baileys credentials, logs every device in once and stores its auth state on disk. The first login
//            of a device whose server holds no pre-keys uploads 812 of them (Baileys' INITIAL_PREKEY_COUNT); after
//            it the device is what a Baileys host has after a restart: registered, keys on the server and on disk.
//   restore  a fresh process loads the N stored auth states and opens N sockets at once (Baileys has no connect
//            governor), reconnecting any socket that closes (what every Baileys host does). Measures the time from
//            process start to every socket `open`, and RSS per open idle socket: RSS with N open minus RSS before
//            the first socket, over N (both after a forced GC, which favours Baileys).
//
// Auth state on disk through Baileys' own useMultiFileAuthState (creds.json and one file per key, read on demand):
// what a Baileys host uses unless it writes its own store. Priming N devices leaves 812 pre-key files each.
//
// Usage:
//   node bench.mjs prime   --control URL --n N --dir DIR [--concurrency C]
//   node --expose-gc bench.mjs restore --control URL --n N --dir DIR [--settle-ms MS]
// The last stdout line is one JSON object with the figures; progress goes to stderr.

import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import makeWASocket, {
    DisconnectReason,
    useMultiFileAuthState,
    WA_CERT_DETAILS,
    initAuthCreds,
    Curve,
    generateSignalPubKey,
    proto
} from 'baileys';
import { muteConsole, silent } from '../baileys/quiet.mjs';

function parseArgs(argv) {
    const out = { phase: argv[0], concurrency: 10, settleMs: 5000, timeoutS: 600 };
    for (let i = 1; i < argv.length; i++) {
        const a = argv[i];
        const next = () => {
            if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
            return argv[++i];
        };
        switch (a) {
            case '--control': out.control = next().replace(/\/$/, ''); break;
            case '--n': out.n = Number(next()); break;
            case '--dir': out.dir = next(); break;
            case '--concurrency': out.concurrency = Number(next()); break;
            case '--settle-ms': out.settleMs = Number(next()); break;
            case '--timeout-s': out.timeoutS = Number(next()); break;
            default: throw new Error(`unknown argument ${a}`);
        }
    }
    if (!['prime', 'restore'].includes(out.phase)) throw new Error('first argument: prime or restore');
    if (!out.control || !out.dir || !(out.n > 0)) throw new Error('--control, --dir and --n are required');
    return out;
}

muteConsole();
const progress = msg => process.stderr.write(`baileys-bench: ${msg}\n`);

async function control(base, method, path, body) {
    const res = await fetch(`${base}${path}`, {
        method,
        headers: { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body)
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
}

const rssKiB = () => Math.round(process.memoryUsage().rss / 1024);
const gc = () => { if (global.gc) { global.gc(); global.gc(); } };
const pct = (sorted, p) => sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null;

// ---- auth state on disk ---------------------------------------------------------------------------------------

const deviceDir = (dir, i) => join(dir, `device-${String(i).padStart(5, '0')}`);

// ---- the simulator's engine device record -> Baileys credentials ------------------------------------------------

const pair = bytes => ({ private: Buffer.from(bytes.slice(0, 32)), public: Buffer.from(bytes.slice(32, 64)) });
const jidOf = (j, server) => `${j.user}:${j.device}@${server}`;

/** What a Baileys socket would have stored after linking this device: the same keys, JIDs and signed identity. */
function credsFromRecord(record) {
    const creds = initAuthCreds();
    creds.noiseKey = pair(record.noise_key);
    creds.signedIdentityKey = pair(record.identity_key);
    creds.signedPreKey = {
        keyPair: pair(record.signed_pre_key),
        signature: Buffer.from(record.signed_pre_key_signature),
        keyId: record.signed_pre_key_id
    };
    creds.registrationId = record.registration_id;
    creds.advSecretKey = Buffer.from(record.adv_secret_key).toString('base64');
    const id = jidOf(record.pn, 's.whatsapp.net');
    const lid = record.lid ? jidOf(record.lid, 'lid') : undefined;
    creds.me = { id, lid, name: record.push_name };
    creds.account = proto.ADVSignedDeviceIdentity.toObject(
        proto.ADVSignedDeviceIdentity.decode(Buffer.from(record.account)),
        { bytes: Buffer }
    );
    creds.signalIdentities = [
        { identifier: { name: lid || id, deviceId: 0 }, identifierKey: generateSignalPubKey(creds.signedIdentityKey.public) }
    ];
    creds.platform = 'smba';
    creds.registered = true;
    return creds;
}

/** Baileys' first login uploads INITIAL_PREKEY_COUNT pre-keys. Generating 812 key pairs costs ~0.5 s of the one
 * Node thread per device, so every primed device uploads the same 812 pairs, generated once here: the server then
 * holds pre-keys for the device and its disk holds the current one, which is all a restore reads. */
const PREKEYS = 812;
let sharedPreKeys = null;
function preKeyPool() {
    if (!sharedPreKeys) {
        sharedPreKeys = {};
        for (let id = 1; id <= PREKEYS; id++) sharedPreKeys[id] = Curve.generateKeyPair();
    }
    return sharedPreKeys;
}

/** The device's key store, with the shared pre-keys readable as if generated by this device. */
function primingKeys(keys) {
    return {
        async get(type, ids) {
            if (type !== 'pre-key') return keys.get(type, ids);
            const pool = preKeyPool();
            return Object.fromEntries(ids.map(id => [id, pool[id]]));
        },
        set: data => keys.set(data)
    };
}

async function mintInto(controlUrl, dir, i) {
    const minted = await control(controlUrl, 'POST', '/v1/devices', { tenant: `baileys-${i}` });
    const device = minted.snapshot.records.find(r => r.kind === 'device');
    if (!device) throw new Error('minted snapshot has no device record');
    const record = JSON.parse(Buffer.from(device.value_b64, 'base64').toString('utf8'));
    const { state, saveCreds } = await useMultiFileAuthState(deviceDir(dir, i));
    Object.assign(state.creds, credsFromRecord(record));
    // 812 pre-keys generated, none uploaded yet: the first login uploads them (see preKeyPool).
    state.creds.nextPreKeyId = PREKEYS + 1;
    state.creds.firstUnuploadedPreKeyId = 1;
    await state.keys.set({ 'pre-key': { [PREKEYS]: preKeyPool()[PREKEYS] } });
    await saveCreds();
    return minted.jid;
}

// ---- sockets ----------------------------------------------------------------------------------------------------

/** One supervised Baileys socket: reconnects after any close that is not a logout, as Baileys hosts do. */
class Device {
    constructor(dir, wsUrl, stats, priming = false) {
        Object.assign(this, { dir, wsUrl, stats, priming, sock: null, openAt: null, stopped: false });
        this.saving = Promise.resolve();
    }

    async start() {
        const { state, saveCreds } = await useMultiFileAuthState(this.dir);
        if (this.priming) state.keys = primingKeys(state.keys);
        Object.assign(this, { state, saveCreds });
        this.connect();
    }

    connect() {
        const attemptAt = performance.now();
        const sock = makeWASocket({
            waWebSocketUrl: this.wsUrl,
            auth: this.state,
            logger: silent,
            version: [2, 3000, 1023000000],
            browser: ['wakeeper-bench', 'Chrome', '1.0'],
            markOnlineOnConnect: false,
            syncFullHistory: false,
            shouldSyncHistoryMessage: () => false,
            fireInitQueries: true,
            connectTimeoutMs: 60_000,
            defaultQueryTimeoutMs: 60_000,
            getMessage: async () => undefined
        });
        this.sock = sock;
        // Baileys has already merged the update into state.creds; persist it, in order.
        sock.ev.on('creds.update', () => {
            this.saving = this.saving.then(() => this.saveCreds());
        });
        sock.ev.on('connection.update', ({ connection, lastDisconnect }) => {
            if (connection === 'open' && this.openAt === null) {
                this.openAt = performance.now();
                this.stats.loginMs.push(this.openAt - attemptAt);
                this.stats.open += 1;
            }
            if (connection === 'close' && !this.stopped) {
                const code = lastDisconnect?.error?.output?.statusCode;
                this.stats.closes += 1;
                if (code === DisconnectReason.loggedOut) {
                    this.stats.loggedOut += 1;
                    return;
                }
                if (this.openAt !== null) {
                    this.openAt = null;
                    this.stats.open -= 1;
                }
                this.stats.reconnects += 1;
                setTimeout(() => this.connect(), 1000);
            }
        });
    }

    async stop() {
        this.stopped = true;
        try { this.sock?.end(undefined); } catch { /* already closed */ }
        await this.saving;
    }
}

async function waitUntil(pred, timeoutMs, what) {
    const deadline = performance.now() + timeoutMs;
    while (!pred()) {
        if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await new Promise(r => setTimeout(r, 20));
    }
}

async function inBatches(items, size, f) {
    for (let i = 0; i < items.length; i += size) {
        await Promise.all(items.slice(i, i + size).map(f));
    }
}

// ---- phases -----------------------------------------------------------------------------------------------------

async function prime(args, wsUrl) {
    const ids = [...Array(args.n).keys()];
    const mintStarted = performance.now();
    const jids = [];
    await inBatches(ids, 32, async i => jids.push(await mintInto(args.control, args.dir, i)));
    progress(`minted ${args.n} devices in ${((performance.now() - mintStarted) / 1000).toFixed(1)} s`);
    const stats = { open: 0, closes: 0, reconnects: 0, loggedOut: 0, loginMs: [] };
    const devices = ids.map(i => new Device(deviceDir(args.dir, i), wsUrl, stats, true));
    const started = performance.now();
    // First logins upload 812 pre-keys each: a few at a time, or the one Node thread starves every handshake.
    await inBatches(devices, args.concurrency, async d => {
        await d.start();
        await waitUntil(() => d.openAt !== null || stats.loggedOut > 0, args.timeoutS * 1000, 'a first login');
        await d.saving;
    });
    if (stats.loggedOut > 0) throw new Error(`${stats.loggedOut} devices were refused (401)`);
    const seconds = (performance.now() - started) / 1000;
    await Promise.all(devices.map(d => d.stop()));
    progress(`primed ${args.n} devices (first login with pre-key upload) in ${seconds.toFixed(1)} s`);
    return { phase: 'prime', n: args.n, first_login_seconds: seconds, jids };
}

async function restore(args, wsUrl) {
    gc();
    const rssBefore = rssKiB();
    const stats = { open: 0, closes: 0, reconnects: 0, loggedOut: 0, loginMs: [] };
    const devices = [...Array(args.n).keys()].map(i => new Device(deviceDir(args.dir, i), wsUrl, stats));
    const t0 = performance.now();
    await Promise.all(devices.map(d => d.start()));
    await waitUntil(() => stats.open >= args.n || stats.loggedOut > 0, args.timeoutS * 1000, `${args.n} open sockets`);
    if (stats.loggedOut > 0) throw new Error(`${stats.loggedOut} devices were refused (401)`);
    const fromSockets = (performance.now() - t0) / 1000;
    const fromProcessStart = process.uptime();
    progress(`${args.n} sockets open ${fromSockets.toFixed(2)} s after the first was created`);
    // Idle, then measure: no socket may have dropped meanwhile.
    await new Promise(r => setTimeout(r, args.settleMs));
    await Promise.all(devices.map(d => d.saving));
    gc();
    const rssOpen = rssKiB();
    const stillOpen = stats.open;
    const login = [...stats.loginMs].sort((a, b) => a - b);
    const result = {
        phase: 'restore',
        n: args.n,
        seconds_from_process_start: Number(fromProcessStart.toFixed(3)),
        seconds_from_first_socket: Number(fromSockets.toFixed(3)),
        sessions_per_second: Number((args.n / fromProcessStart).toFixed(1)),
        login_ms_p50: Math.round(pct(login, 50)),
        login_ms_p99: Math.round(pct(login, 99)),
        rss_before_kib: rssBefore,
        rss_open_kib: rssOpen,
        rss_per_session_kib: Number(((rssOpen - rssBefore) / args.n).toFixed(1)),
        open_after_settle: stillOpen,
        reconnects: stats.reconnects,
        gc_forced: Boolean(global.gc)
    };
    await Promise.all(devices.map(d => d.stop()));
    return result;
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const keys = await control(args.control, 'GET', '/v1/keys');
    // Baileys verifies the intermediate certificate against this key: pin the simulator's root instead of WhatsApp's.
    WA_CERT_DETAILS.PUBLIC_KEY = Buffer.from(keys.root_public_key, 'hex');
    const wsUrl = args.wsUrl || (await simWsUrl(args.control));
    await mkdir(args.dir, { recursive: true });
    const result = args.phase === 'prime' ? await prime(args, wsUrl) : await restore(args, wsUrl);
    if (args.phase === 'prime') await checkPrimed(args.control, result);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    // Baileys keeps timers alive; the figures are out.
    process.exit(0);
}

/** Every primed device's server must hold pre-keys now, or the restore would measure uploads. */
async function checkPrimed(controlUrl, result) {
    const obs = await control(controlUrl, 'GET', '/v1/observations');
    const without = result.jids.filter(j => !(obs.devices[j]?.prekeys_held > 5)).length;
    if (without > 0) throw new Error(`${without} primed devices have no pre-keys on the server`);
    result.devices_with_prekeys = result.jids.length - without;
    delete result.jids;
}

/** The simulator announces its WebSocket URL on start; the bench passes it through the environment. */
async function simWsUrl() {
    const url = process.env.WA_SIM_WS_URL;
    if (!url) throw new Error('WA_SIM_WS_URL is not set (the ws:// URL wa-sim printed on start)');
    return url;
}

main().catch(e => {
    progress(`failed: ${e.stack || e}`);
    process.exit(1);
});
