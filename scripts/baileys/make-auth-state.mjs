#!/usr/bin/env node
// Generates a real Baileys auth-state folder, written by Baileys' own `useMultiFileAuthState`, for wakeeper's
// import tests. Every file is produced by Baileys code paths, not by hand:
//
//   - creds.json from `initAuthCreds` + `saveCreds`;
//   - pre-key-*.json from `getNextPreKeys` (what Baileys runs before uploading pre-keys);
//   - with --jid: the pairing half of Baileys (`configureSuccessfulPairing`) run on a <pair-success> stanza whose
//     device identity this script signs the way the phone does, so creds.json gets `me`, `account` and
//     `signalIdentities` exactly as after a QR-code link;
//   - with --signal: a second Baileys party (the "peer", its own folder) exchanges real Signal messages with us
//     through Baileys' libsignal repository, which leaves session-*.json, identity-key-*.json, sender-key-*.json
//     and lid-mapping-*.json in our folder; app-state-sync-key-*.json and app-state-sync-version-*.json are
//     written through the key store the way Baileys' app-state code does.
//
// Messages the peer encrypts to us but we never decrypt are written to the summary, so a test can check that the
// imported Signal state still decrypts them.
//
// Usage:
//   node make-auth-state.mjs --dir DIR --summary FILE [--jid JID --lid LID] [--name NAME] [--signal --peer-dir DIR]
//
// The summary (JSON) names the device: jid, lid, name, noise and identity public keys (hex), registration id,
// and with --signal the pending ciphertexts.

import { writeFile } from 'node:fs/promises';
import { randomBytes, randomInt } from 'node:crypto';
import {
    useMultiFileAuthState,
    getNextPreKeys,
    configureSuccessfulPairing,
    Curve,
    hmacSign,
    generateSignalPubKey,
    proto,
    addTransactionCapability,
    DEFAULT_CONNECTION_CONFIG,
    makeLtHashGenerator,
    newLTHashState,
    WA_ADV_ACCOUNT_SIG_PREFIX
} from 'baileys';
import { muteConsole, silent } from './quiet.mjs';

function parseArgs(argv) {
    const out = { signal: false };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const next = () => {
            if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
            return argv[++i];
        };
        switch (a) {
            case '--dir': out.dir = next(); break;
            case '--summary': out.summary = next(); break;
            case '--jid': out.jid = next(); break;
            case '--lid': out.lid = next(); break;
            case '--name': out.name = next(); break;
            case '--peer-dir': out.peerDir = next(); break;
            case '--signal': out.signal = true; break;
            default: throw new Error(`unknown argument ${a}`);
        }
    }
    if (!out.dir || !out.summary) throw new Error('--dir and --summary are required');
    if (out.signal && (!out.jid || !out.peerDir)) throw new Error('--signal needs --jid and --peer-dir');
    return out;
}

muteConsole();

const hex = buf => Buffer.from(buf).toString('hex');

/** The phone's half of linking a companion: an account key signs the companion's identity, and the result is
 * wrapped in the HMAC container keyed by the companion's ADV secret (which the QR code carried). */
function phoneSignedIdentity(creds) {
    const accountKey = Curve.generateKeyPair();
    const details = proto.ADVDeviceIdentity.encode({
        rawId: randomInt(1, 2 ** 31),
        timestamp: Math.floor(Date.now() / 1000),
        keyIndex: randomInt(1, 50),
        accountType: proto.ADVEncryptionType.E2EE,
        deviceType: proto.ADVEncryptionType.E2EE
    }).finish();
    const accountSignature = Curve.sign(
        accountKey.private,
        Buffer.concat([WA_ADV_ACCOUNT_SIG_PREFIX, details, creds.signedIdentityKey.public])
    );
    const signed = proto.ADVSignedDeviceIdentity.encode({
        details,
        accountSignatureKey: accountKey.public,
        accountSignature
    }).finish();
    const hmac = hmacSign(signed, Buffer.from(creds.advSecretKey, 'base64'));
    return proto.ADVSignedDeviceIdentityHMAC.encode({
        details: signed,
        hmac,
        accountType: proto.ADVEncryptionType.E2EE
    }).finish();
}

/** Runs Baileys' own pairing code on a <pair-success> stanza, as its socket does when the phone links us. */
function pair(creds, { jid, lid, name }) {
    const content = [
        { tag: 'device-identity', attrs: { 'key-index': '1' }, content: phoneSignedIdentity(creds) },
        { tag: 'platform', attrs: { name: 'smbi' } },
        { tag: 'device', attrs: lid ? { jid, lid } : { jid } }
    ];
    if (name) content.push({ tag: 'biz', attrs: { name } });
    const stanza = {
        tag: 'iq',
        attrs: { from: 's.whatsapp.net', type: 'set', id: 'pair-1' },
        content: [{ tag: 'pair-success', attrs: {}, content }]
    };
    const { creds: update } = configureSuccessfulPairing(stanza, creds);
    Object.assign(creds, update);
    // After the first login Baileys keeps the LID and the push name in `me` (creds.update on <success> and on
    // the push-name app-state action).
    creds.me = { ...creds.me, ...(lid ? { lid } : {}), ...(name ? { name } : {}) };
    creds.registered = true;
}

async function openParty(dir) {
    const { state, saveCreds } = await useMultiFileAuthState(dir);
    const keys = addTransactionCapability(state.keys, silent, { maxCommitRetries: 3, delayBetweenTriesMs: 10 });
    return { creds: state.creds, rawKeys: state.keys, keys, saveCreds };
}

async function addPreKeys(party, count) {
    const { update, preKeys } = await getNextPreKeys({ creds: party.creds, keys: party.rawKeys }, count);
    Object.assign(party.creds, update);
    return preKeys;
}

/** A pre-key bundle of `party` as a server would hand it out (33-byte Signal public keys). */
function bundleOf(party, preKeys) {
    const [id, key] = Object.entries(preKeys)[0];
    return {
        registrationId: party.creds.registrationId,
        identityKey: generateSignalPubKey(party.creds.signedIdentityKey.public),
        signedPreKey: {
            keyId: party.creds.signedPreKey.keyId,
            publicKey: generateSignalPubKey(party.creds.signedPreKey.keyPair.public),
            signature: party.creds.signedPreKey.signature
        },
        preKey: { keyId: Number(id), publicKey: generateSignalPubKey(key.public) }
    };
}

const repositoryOf = party =>
    DEFAULT_CONNECTION_CONFIG.makeSignalRepository({ creds: party.creds, keys: party.keys }, silent, async () => []);

async function signalTraffic(us, ourJid, peer, peerJid, peerLid) {
    const ours = repositoryOf(us);
    const theirs = repositoryOf(peer);
    const pending = [];

    // Our LID mapping for the peer: Baileys 7 keys the peer's session by its LID address (`<lid>_1.0`).
    await ours.lidMapping.storeLIDPNMappings([{ lid: peerLid, pn: peerJid }]);

    // The peer starts a session with us from our pre-key bundle and writes first.
    const ourBundlePreKeys = await us.rawKeys.get('pre-key', ['1']);
    await theirs.injectE2ESession({ jid: ourJid, session: bundleOf(us, { 1: ourBundlePreKeys['1'] }) });
    const first = await theirs.encryptMessage({ jid: ourJid, data: Buffer.from('hello 1') });
    if ((await ours.decryptMessage({ jid: peerLid, type: first.type, ciphertext: first.ciphertext })).toString() !== 'hello 1') {
        throw new Error('first message did not decrypt');
    }
    // We answer (our sending chain), they read it, and write twice; we read only the second, so the first leaves
    // a skipped message key in our session.
    const reply = await ours.encryptMessage({ jid: peerLid, data: Buffer.from('reply 1') });
    await theirs.decryptMessage({ jid: ourJid, type: reply.type, ciphertext: reply.ciphertext });
    const skipped = await theirs.encryptMessage({ jid: ourJid, data: Buffer.from('hello 2 (skipped)') });
    const third = await theirs.encryptMessage({ jid: ourJid, data: Buffer.from('hello 3') });
    await ours.decryptMessage({ jid: peerLid, type: third.type, ciphertext: third.ciphertext });
    pending.push({ type: skipped.type, plaintext: 'hello 2 (skipped)', ciphertext: skipped.ciphertext.toString('base64') });
    // Sent after our state was saved: only the imported state can read it.
    const later = await theirs.encryptMessage({ jid: ourJid, data: Buffer.from('after the import') });
    pending.push({ type: later.type, plaintext: 'after the import', ciphertext: later.ciphertext.toString('base64') });

    // A session we opened ourselves and that was never answered (pending pre-key, our base key).
    const stranger = await openParty(`${peer.dir}-stranger`);
    const strangerPreKeys = await addPreKeys(stranger, 2);
    const strangerJid = '5511955554444:3@s.whatsapp.net';
    await ours.injectE2ESession({ jid: strangerJid, session: bundleOf(stranger, strangerPreKeys) });
    await ours.encryptMessage({ jid: strangerJid, data: Buffer.from('unanswered') });

    // Groups: our own sender key, and the peer's, received through its distribution message.
    const group = '120363000000000001@g.us';
    await ours.encryptGroupMessage({ group, meId: ourJid, data: Buffer.from('to the group') });
    const fromPeer = await theirs.encryptGroupMessage({ group, meId: peerJid, data: Buffer.from('group hello') });
    await ours.processSenderKeyDistributionMessage({
        item: { groupId: group, axolotlSenderKeyDistributionMessage: fromPeer.senderKeyDistributionMessage },
        authorJid: peerJid
    });
    await ours.decryptGroupMessage({ group, authorJid: peerJid, msg: fromPeer.ciphertext });
    const groupLater = await theirs.encryptGroupMessage({ group, meId: peerJid, data: Buffer.from('group after the import') });
    return {
        peer: { jid: peerJid, lid: peerLid },
        dm: pending,
        group: {
            id: group,
            author: peerJid,
            plaintext: 'group after the import',
            ciphertext: Buffer.from(groupLater.ciphertext).toString('base64')
        }
    };
}

/** App-state keys and one collection's LT-hash state, stored through the key store as Baileys' app-state code
 * stores them (key data as the decoded protobuf message; the state as `LTHashState`). */
async function appState(us) {
    const stored = {};
    for (let i = 0; i < 2; i++) {
        const keyId = Buffer.concat([Buffer.from([0, 0]), randomBytes(4)]).toString('base64');
        stored[keyId] = proto.Message.AppStateSyncKeyData.fromObject({
            keyData: randomBytes(32),
            fingerprint: { rawId: randomInt(1, 2 ** 31), currentIndex: i + 1, deviceIndexes: [0, i + 1] },
            timestamp: Date.now() - (1 - i) * 1000
        });
    }
    await us.keys.set({ 'app-state-sync-key': stored });
    const gen = makeLtHashGenerator(newLTHashState());
    for (let i = 0; i < 3; i++) {
        gen.mix({ indexMac: randomBytes(32), valueMac: randomBytes(32), operation: proto.SyncdMutation.SyncdOperation.SET });
    }
    const { hash, indexValueMap } = gen.finish();
    await us.keys.set({ 'app-state-sync-version': { regular_high: { version: 7, hash, indexValueMap } } });
    return Object.keys(stored);
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const us = await openParty(args.dir);
    us.dir = args.dir;
    await addPreKeys(us, 30);
    if (args.jid) pair(us.creds, args);

    const summary = {
        jid: us.creds.me?.id ?? null,
        lid: us.creds.me?.lid ?? null,
        name: us.creds.me?.name ?? null,
        noisePublic: hex(us.creds.noiseKey.public),
        identityPublic: hex(us.creds.signedIdentityKey.public),
        registrationId: us.creds.registrationId
    };

    if (args.signal) {
        const peer = await openParty(args.peerDir);
        peer.dir = args.peerDir;
        await addPreKeys(peer, 5);
        const peerJid = '5511977776666@s.whatsapp.net';
        const peerLid = '201234567890123@lid';
        peer.creds.me = { id: peerJid, lid: peerLid };
        Object.assign(summary, await signalTraffic(us, args.jid, peer, peerJid, peerLid));
        summary.appStateKeys = await appState(us);
        await peer.saveCreds();
    }
    await us.saveCreds();
    await writeFile(args.summary, JSON.stringify(summary, null, 2));
}

main().then(
    () => process.exit(0),
    err => {
        process.stderr.write(`make-auth-state: ${err?.stack ?? err}\n`);
        process.exit(1);
    }
);
