// Keeps Baileys and libsignal quiet, so that stdout carries only what a script prints on purpose.

/** A pino-like logger that drops everything (Baileys wants one). */
export const silent = {
    level: 'silent',
    child() { return silent; },
    trace() {}, debug() {}, info() {}, warn() {}, error() {}, fatal() {}
};

/** libsignal narrates session changes on the console; this mutes its three channels. */
export function muteConsole() {
    console.info = () => {};
    console.log = () => {};
    console.warn = () => {};
}
