#!/usr/bin/env node
// A minimal augsvc client written from protos/augsvc/v1/augment.proto alone, with
// the generic @grpc/grpc-js and @grpc/proto-loader libraries (no generated code, no
// augsvc Python code). It lists the server's datasets, then streams the requested
// batches and reassembles each one from its header Frame and chunk Frames.
//
//   node client.js ADDRESS DATASET SEED EPOCH BATCH_SIZE INDEX [INDEX ...]
//
// stdout: one JSON line per dataset ({"dataset": {...}}), then ONE JSON line per batch:
//   {"batch_index", "shape", "dtype", "layout", "labels", "sample_ids", "sha256"}
// where sha256 is the hex digest of the batch's payload (the raw array bytes).
// Errors go to stderr and the exit status is 1 (2 for a usage error).
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'protos', 'augsvc', 'v1', 'augment.proto');
const USAGE = 'usage: node client.js ADDRESS DATASET SEED EPOCH BATCH_SIZE INDEX [INDEX ...]';
// Bytes per element of each dtype the .proto allows (BatchHeader.dtype).
const ITEMSIZE = { uint8: 1, float16: 2, float32: 4 };
// Chunks are at most 4 MiB and a header carries a few varints per sample: leave room.
const MAX_MESSAGE_BYTES = 64 << 20;

class UsageError extends Error {}

function fail(message, status = 1) {
  process.stderr.write(`augsvc-node-client: error: ${message}\n`);
  process.exit(status);
}

// A non-negative decimal integer argument, up to `max` (a BigInt); returned as a string
// so 64-bit values (seed, epoch) keep full precision through proto-loader.
function uintArg(name, text, max) {
  if (!/^\d+$/.test(text) || BigInt(text) > max) {
    throw new UsageError(`${name} must be an integer in [0, ${max}], got ${JSON.stringify(text)}`);
  }
  return text;
}

// A 64-bit field decoded as a string (longs: String) -> a JS number, if exact.
function toNumber(name, value) {
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw new Error(`${name} ${value} is not a safe integer`);
  return n;
}

// Checks a BatchHeader against the wire format and returns its payload size in bytes.
function checkHeader(header, expectedIndex) {
  const { batch_index: index, shape, dtype, layout } = header;
  if (index !== expectedIndex) throw new Error(`got batch ${index}, expected batch ${expectedIndex}`);
  if (!(dtype in ITEMSIZE)) throw new Error(`batch ${index}: unknown dtype ${JSON.stringify(dtype)}`);
  if (shape.length !== layout.length) {
    throw new Error(`batch ${index}: shape [${shape}] does not match layout ${JSON.stringify(layout)}`);
  }
  const size = shape.reduce((a, b) => a * b, 1) * ITEMSIZE[dtype];
  const payloadBytes = toNumber('payload_bytes', header.payload_bytes);
  if (payloadBytes !== size) {
    throw new Error(`batch ${index}: payload_bytes ${payloadBytes} != product([${shape}]) * ` +
                    `itemsize(${dtype}) = ${size}`);
  }
  for (const name of ['labels', 'sample_ids']) {
    if (header[name].length !== shape[0]) {
      throw new Error(`batch ${index}: ${header[name].length} ${name} for ${shape[0]} samples`);
    }
  }
  if (size > 0 && header.num_chunks === 0) throw new Error(`batch ${index}: ${size} bytes in 0 chunks`);
  return size;
}

// One JSON line describing a complete batch.
function report(header, payload) {
  return JSON.stringify({
    batch_index: header.batch_index,
    shape: header.shape,
    dtype: header.dtype,
    layout: header.layout,
    labels: header.labels.map((v) => toNumber('label', v)),
    sample_ids: header.sample_ids.map((v) => toNumber('sample_id', v)),
    sha256: crypto.createHash('sha256').update(payload).digest('hex'),
  });
}

async function main(argv) {
  if (argv.length < 6) throw new UsageError('missing arguments');
  const [address, dataset, seedText, epochText, batchSizeText, ...indexTexts] = argv;
  const U64 = (1n << 64n) - 1n;
  const U32 = (1n << 32n) - 1n;
  const seed = uintArg('SEED', seedText, U64);
  const epoch = uintArg('EPOCH', epochText, U64);
  const batchSize = Number(uintArg('BATCH_SIZE', batchSizeText, U32));
  if (batchSize < 1) throw new UsageError('BATCH_SIZE must be >= 1');
  const batches = indexTexts.map((t) => Number(uintArg('INDEX', t, U32)));

  // keepCase: field names exactly as in the .proto; 64-bit integers as decimal strings;
  // unset scalars/repeated fields filled with their defaults; oneofs: `frame.kind`
  // names the member that is set ("header" or "chunk").
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const { Augment } = grpc.loadPackageDefinition(definition).augsvc.v1;
  const client = new Augment(address, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  });
  try {
    // ListDatasets (unary): print every dataset, and check ours is among them.
    const listed = await new Promise((resolve, reject) => {
      client.ListDatasets({}, { deadline: Date.now() + 30000 },
        (err, response) => (err ? reject(err) : resolve(response)));
    });
    for (const d of listed.datasets) {
      process.stdout.write(JSON.stringify({ dataset: {
        name: d.name, num_samples: toNumber('num_samples', d.num_samples), num_classes: d.num_classes,
      } }) + '\n');
    }
    if (!listed.datasets.some((d) => d.name === dataset)) {
      throw new Error(`the server has no dataset ${JSON.stringify(dataset)}`);
    }

    // StreamBatches (server streaming). Only size, hsv and pca are set: every other
    // AugmentSpec field is left unset and takes the server's documented default.
    const call = client.StreamBatches({
      dataset, seed, epoch, batch_size: batchSize, batches,
      spec: { size: { height: 32, width: 32 }, hsv: false, pca: false },
    });
    let header = null; // header of the batch being reassembled
    let payload = null; // its bytes, filled chunk by chunk
    let filled = 0;
    let chunks = 0;
    let done = 0; // batches completed
    const finish = () => {
      if (filled !== payload.length) {
        throw new Error(`batch ${header.batch_index}: chunks carried ${filled} of ${payload.length} bytes`);
      }
      process.stdout.write(report(header, payload) + '\n');
      header = null;
      done += 1;
    };
    try {
      for await (const frame of call) {
        if (frame.kind === 'header') {
          if (header !== null) throw new Error(`header while batch ${header.batch_index} is incomplete`);
          if (done >= batches.length) throw new Error(`unrequested batch ${frame.header.batch_index}`);
          header = frame.header;
          payload = Buffer.alloc(checkHeader(header, batches[done]));
          filled = chunks = 0;
          if (header.num_chunks === 0) finish();
        } else if (frame.kind === 'chunk') {
          if (header === null) throw new Error('chunk frame before any batch header');
          if (filled + frame.chunk.length > payload.length) {
            throw new Error(`batch ${header.batch_index}: chunks exceed payload_bytes ${payload.length}`);
          }
          filled += Buffer.from(frame.chunk.buffer, frame.chunk.byteOffset, frame.chunk.length)
            .copy(payload, filled);
          chunks += 1;
          if (chunks === header.num_chunks) finish();
        } else {
          throw new Error('a Frame with neither header nor chunk');
        }
      }
    } catch (err) {
      call.cancel(); // stop the server's work on a protocol error (no-op if the call ended)
      throw err;
    }
    if (header !== null) throw new Error(`stream ended in the middle of batch ${header.batch_index}`);
    if (done !== batches.length) throw new Error(`got ${done} of ${batches.length} batches`);
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  if (err instanceof UsageError) fail(`${err.message}\n${USAGE}`, 2);
  // gRPC errors carry a status code name and the server's message (`details`).
  if (err.code !== undefined && err.details !== undefined) {
    fail(`gRPC ${grpc.status[err.code] || err.code}: ${err.details}`);
  }
  fail(err.message);
});
