// The official socket.io-client v4, driven by tests/it/realtime.rs. One JSON line per event on
// stdout; the Rust test reads them. Usage: node socket_client.cjs '<json config>'
//   {url, token, mode: "send" | "listen" | "connect", chatId?, text?, clientId?}
// send:    join the chat, send a message with an ack, wait for its message:new, exit.
// listen:  join the chat, print {"event":"ready"}, wait for one message:new, exit.
// connect: connect and print the outcome (connect_error message when refused), exit.
// events:  (join the chat if chatId,) print {"event":"ready"}, then print every event the
//          server emits until `expect` of them came.
// typing:  join the chat, emit typing:start once, print {"event":"ready"}, stay holdMs.
// raw:     emit each [event, payload] of `emits` with an ack and print the acks.
const { io } = require("socket.io-client");

const config = JSON.parse(process.argv[2]);
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const fail = (why) => {
  out({ event: "failed", why });
  process.exit(1);
};
setTimeout(() => fail("timed out"), 15000).unref();

const socket = io(config.url, {
  auth: config.token === undefined ? undefined : { token: config.token },
  transports: config.transports || ["websocket"],
  reconnection: false,
});

socket.on("connect_error", (err) => {
  out({ event: "connect_error", message: err.message });
  process.exit(0);
});

socket.on("connect", async () => {
  if (config.mode === "events") {
    // Every event the server sends, in order, until `expect` of them came.
    let left = config.expect;
    socket.onAny((event, data) => {
      if ((config.ignore || []).includes(event)) return;
      out({ event, data });
      if (--left === 0) {
        socket.close();
        process.exit(0);
      }
    });
    if (config.chatId) {
      out({ event: "joined", ack: await socket.emitWithAck("chat:join", { chatId: config.chatId }) });
    }
    out({ event: "ready" });
    return;
  }
  if (config.mode === "raw") {
    // Each [event, payload] of config.emits with an ack; prints the acks, then checks that the
    // socket is still usable.
    for (const [event, payload] of config.emits) {
      const ack = await socket.timeout(5000).emitWithAck(event, payload).catch((e) => ({ timeout: String(e) }));
      out({ event: "ack", sent: event, ack });
    }
    out({ event: "still-connected", connected: socket.connected });
    socket.close();
    process.exit(0);
  }
  if (config.mode === "typing") {
    // Join, start typing once, print ready, stay connected for holdMs.
    out({ event: "joined", ack: await socket.emitWithAck("chat:join", { chatId: config.chatId }) });
    socket.emit("typing:start", { chatId: config.chatId });
    out({ event: "ready" });
    setTimeout(() => {
      socket.close();
      process.exit(0);
    }, config.holdMs);
    return;
  }
  if (config.mode === "connect") {
    out({ event: "connected" });
    socket.close();
    process.exit(0);
  }
  const joined = await socket.emitWithAck("chat:join", { chatId: config.chatId });
  out({ event: "joined", ack: joined });
  // A refused join still tries to send (a non-member must be refused there too).
  if (!joined.ok && config.mode !== "send") {
    socket.close();
    process.exit(0);
  }
  // The ack and the broadcast can arrive in one read; an awaited ack then resolves after the
  // broadcast's handler ran. Print the ack first either way.
  const received = new Promise((resolve) => socket.once("message:new", resolve));
  const report = async () => {
    out({ event: "message:new", message: await received });
    socket.close();
    process.exit(0);
  };
  if (config.mode === "listen") {
    out({ event: "ready" });
    await report();
    return;
  }
  const ack = await socket.emitWithAck("message:send", {
    chatId: config.chatId,
    clientId: config.clientId,
    text: config.text,
  });
  out({ event: "sent", ack });
  if (!ack.ok || !joined.ok) {
    socket.close();
    process.exit(0);
  }
  await report();
});
