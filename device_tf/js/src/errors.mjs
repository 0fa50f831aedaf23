/**
 * Errors the JS device raises on purpose. They mirror shared_schema/_exceptions.py so a
 * message reads the same whichever runtime produced it, and a caller can tell "the bundle
 * or a frame cannot be trusted" from a bug.
 */

export class SpliteasyError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

export class ManifestError extends SpliteasyError {}

export class FrameError extends SpliteasyError {}
export class TruncatedFrame extends FrameError {}
export class BadMagic extends FrameError {}
export class UnsupportedVersion extends FrameError {}
export class FrameSizeMismatch extends FrameError {}
export class FrameSpecMismatch extends FrameError {}

/** The server answered with an error (4xx/5xx JSON {error, detail}) or not at all. */
export class ProtocolError extends SpliteasyError {
  constructor(message, { status = 0, code = 'network', body = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/**
 * 409 step_conflict with the server's position: the session there expects `nextStep`
 * (after a server restart from a checkpoint, lower than the device's step).
 */
export class StepConflict extends ProtocolError {
  constructor(message, { nextStep, durableStep = null, expect = null }) {
    super(message, { status: 409, code: 'step_conflict' });
    this.nextStep = nextStep;
    this.durableStep = durableStep;
    this.expect = expect;
  }
}

/** A data file, a bundle file or a runtime limit the device cannot work with. */
export class DeviceError extends SpliteasyError {}
