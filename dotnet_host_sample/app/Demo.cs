// The demo, each step a method: list workflows; run a session with a
// progress bar fed by the board (no GIL, no calls); run a batch of eight with
// one seed each; pause, resume and cancel a session; run img2img from an
// input the host fills in place; run the design document's coordination and
// aggregate its status; show bad input coming back as envelopes; close the
// worker while a thread keeps calling. Every image is written as PNG straight
// from the worker's memory, and --summary lists them with their seeds for the
// tests to compare against Python's own pixels.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Threading;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public sealed class Demo
    {
        sealed class Checks
        {
            public int Failed;

            public void That(bool condition, string what)
            {
                if (condition) return;
                Failed++;
                Console.WriteLine("CHECK FAILED: " + what);
            }
        }

        const string Prompt = "a red circle on a blue background";

        readonly EmbeddedProcessingWorker worker;
        readonly ServiceProcessing service;
        readonly string outputFolder;
        readonly Checks checks = new Checks();
        readonly List<object> files = new List<object>();
        readonly Dictionary<string, object> summary = new Dictionary<string, object>();
        ProgressBoard board;  // open while the steps run

        Demo(PythonRuntime runtime, string outputFolder)
        {
            worker = new EmbeddedProcessingWorker(runtime);
            service = new ServiceProcessing(worker);
            this.outputFolder = outputFolder;
        }

        public static int Run(PythonRuntime runtime, string outputFolder, string summaryPath)
        {
            Directory.CreateDirectory(outputFolder);
            return new Demo(runtime, outputFolder).Run(summaryPath);
        }

        int Run(string summaryPath)
        {
            var total = Stopwatch.StartNew();
            string sessionId;
            board = worker.OpenBoard();
            using (board)
            using (var logs = new LogPump(worker, record => Console.WriteLine(
                "  [python " + record.Text("level") + "] " + record.Text("message")), TimeSpan.FromMilliseconds(200)))
            {
                ListWorkflows();
                sessionId = OneSession();
                BatchOfEight();
                string controlledId = PauseResumeCancel();
                Img2ImgFromInput();
                Coordination();
                BadInputIsAnEnvelope();
                service.DeleteSessionAsync(controlledId).Wait();
                logs.Drain();
                summary["python_log_records"] = logs.Delivered;
                summary["python_log_dropped"] = logs.Dropped;
            }
            CloseWhileCalled(sessionId);
            summary["files"] = files;
            summary["dotnet_runtime"] = DotNetRuntime.Name;
            summary["checks_failed"] = checks.Failed;
            summary["seconds"] = total.Elapsed.TotalSeconds;
            if (summaryPath != null) File.WriteAllText(summaryPath, new Reply(summary).ToString());
            Console.WriteLine(checks.Failed == 0
                ? "demo passed: " + files.Count + " PNG files in " + outputFolder + ", " + total.ElapsedMilliseconds + " ms"
                : "demo FAILED: " + checks.Failed + " check(s)");
            return checks.Failed == 0 ? 0 : 1;
        }

        /// <summary>The built-in workflows, one of them read as a dynamic reply.</summary>
        void ListWorkflows()
        {
            var workflows = service.GetWorkflowsAsync().Result;
            Console.WriteLine("workflows (" + workflows.Count + "):");
            foreach (var workflow in workflows)
                Console.WriteLine("  " + workflow.Text("id") + ": " + workflow.Text("name"));
            checks.That(workflows.Count >= 3, "three built-in workflows listed");
            dynamic basic = worker.GetWorkflow("img-generation-basic");  // member access, no JSON anywhere
            checks.That(basic.success == true && basic.workflow.id == "img-generation-basic"
                        && basic.workflow.steps.Count == 2, "dynamic reply: reply.workflow.id");
        }

        /// <summary>1. One session, its progress from the board.</summary>
        string OneSession()
        {
            var clock = Stopwatch.StartNew();
            var started = service.StartSessionAsync("img-generation-basic", new { prompt = Prompt, seed = 42, steps = 60 }).Result;
            checks.That(started.Success, "session accepted: " + started.Error);
            string sessionId = started.Text("session_id");
            var final = FollowOnBoard((int)started.Number("board_slot"), sessionId);
            var status = worker.GetSessionStatus(sessionId);
            checks.That(status.Status == "completed", "session completed (" + status.Status + ")");
            var session = service.GetSessionStatusAsync(sessionId).Result;
            WriteOutputs(session.List("outputs"), "session", "img-generation-basic", new { prompt = Prompt, seed = 42, steps = 60 });
            Console.WriteLine("session: " + final.Status + " in " + clock.ElapsedMilliseconds + " ms");
            return sessionId;
        }

        /// <summary>2. A batch of eight, one seed each (the bare form the C# client sends).</summary>
        void BatchOfEight()
        {
            var clock = Stopwatch.StartNew();
            var batch = service.StartBatchAsync("img-generation-basic",
                new { prompt = Prompt, seed = 100, steps = 20, total_images = 8 }).Result;
            checks.That(batch.Success, "batch accepted: " + batch.Error);
            string batchId = batch.Text("batch_id");
            FollowOnBoard((int)batch.Number("board_slot"), batchId);
            var batchStatus = worker.GetBatchStatus(batchId);
            checks.That(batchStatus.Status == "completed" && batchStatus.ProcessedItems == 8,
                        "batch of 8 completed (" + batchStatus.Status + ", " + batchStatus.ProcessedItems + ")");
            var batchReply = service.GetBatchStatusAsync(batchId).Result;
            WriteOutputs(batchReply.List("outputs"), "batch", "img-generation-basic", new { prompt = Prompt, steps = 20 });
            double seconds = clock.Elapsed.TotalSeconds;
            Console.WriteLine("batch: 8 images in " + (int)(seconds * 1000) + " ms (" + (8 / seconds).ToString("F1")
                              + " img/s), " + ((Reply)batchReply["metrics"]).Number("total_batches") + " denoising group(s)");
        }

        /// <summary>3. Pause, resume and cancel a running session; its id, for deleting at the end.</summary>
        string PauseResumeCancel()
        {
            var clock = Stopwatch.StartNew();
            var controlled = service.StartSessionAsync("img-generation-basic", new { seed = 7, steps = 150 }).Result;
            string controlledId = controlled.Text("session_id");
            int slot = (int)controlled.Number("board_slot");
            BoardRow row;
            WaitForBoard(slot, r => r.DenoiseStep >= 10);
            var paused = service.PauseAsync(controlledId).Result;
            checks.That(paused.Text("status") == "paused", "paused (" + paused.Text("status") + ")");
            board.TryRead(slot, out row);
            long heldAt = row.DenoiseStep;
            Thread.Sleep(300);
            board.TryRead(slot, out row);
            checks.That(row.DenoiseStep == heldAt && row.Status == "paused",
                        "no denoising while paused (step " + heldAt + " -> " + row.DenoiseStep + ")");
            var resumed = service.ResumeAsync(controlledId).Result;
            checks.That(resumed.Success, "resumed: " + resumed.Text("status"));
            WaitForBoard(slot, r => r.DenoiseStep > heldAt + 5);
            var cancelled = service.CancelAsync(controlledId).Result;
            checks.That(cancelled.Text("status") == "cancelled", "cancelled (" + cancelled.Text("status") + ")");
            Console.WriteLine("pause at step " + heldAt + ", resume, cancel: " + clock.ElapsedMilliseconds + " ms");
            return controlledId;
        }

        /// <summary>4. img2img from an input the host writes in place.</summary>
        void Img2ImgFromInput()
        {
            var clock = Stopwatch.StartNew();
            Reply inputError;
            string inputId;
            using (var input = worker.AllocateInput(32, 32, out inputError))
            {
                checks.That(input != null, "input allocated: " + (inputError == null ? "" : inputError.Error));
                for (int y = 0; y < input.Height; y++)
                    for (int x = 0; x < input.Width; x++)
                    {
                        input.Set(y, x, 0, (byte)(x * 8));
                        input.Set(y, x, 1, (byte)(y * 8));
                        input.Set(y, x, 2, 128);
                    }
                inputId = input.InputId;
            }
            var img2img = worker.ExecuteWorkflow(new
            {
                workflow_id = "img2img-basic",
                parameters = new { init_image = inputId, strength = 0.6, steps = 20, seed = 5 },
                background = false,
            });
            checks.That(img2img.Text("status") == "completed", "img2img from the input buffer: " + img2img.Error);
            WriteOutputs(img2img.List("outputs"), "img2img", "img2img-basic", new { strength = 0.6, steps = 20, seed = 5 });
            Console.WriteLine("img2img from a host-filled buffer: " + clock.ElapsedMilliseconds + " ms");
        }

        /// <summary>5. The document's coordination (model -> inference batch -> enhance) and its status aggregation.</summary>
        void Coordination()
        {
            var clock = Stopwatch.StartNew();
            string coordinationId = Guid.NewGuid().ToString();
            var coordination = service.CoordinateAsync(coordinationId, "builtin:tiny-sd",
                new { prompt = "a yellow triangle on a black background", seed = 11, steps = 10 }, 3).Result;
            checks.That(coordination.Success, "coordination accepted: " + coordination.Error);
            var coordinated = service.WaitForSessionAsync(coordinationId, TimeSpan.FromMilliseconds(20),
                                                          TimeSpan.FromMinutes(5)).Result;
            var seeds = new List<object>();
            foreach (Reply output in coordinated.List("outputs")) seeds.Add(output.Number("seed"));
            checks.That(coordinated.Text("status") == "completed" && seeds.Count == 3,
                        "coordination completed with 3 images (" + coordinated.Text("status") + ")");
            var loadStep = (Reply)coordinated.List("step_results")[0];
            checks.That(Equals(((Reply)loadStep["result"])["loaded"], true), "model step loaded the model");
            var parts = service.GetAggregatedStatusAsync(coordinationId).Result;
            var domainStates = new Dictionary<string, object>();
            foreach (var part in parts)
            {
                checks.That(part.Value.Success && part.Value.Text("status") == "completed",
                            part.Key + ".get_status for the session: " + part.Value.Error);
                domainStates[part.Key] = part.Value.Text("status");
            }
            var modelState = ((Reply)parts["model"].List("models")[0]).Text("state");
            var imagesDone = ((Reply)parts["inference"]["counts"]).Number("done");
            var enhanceState = ((Reply)parts["postprocessing"].List("steps")[0]).Text("status");
            checks.That(modelState == "loaded" && imagesDone == 3 && enhanceState == "completed",
                        "aggregated: model " + modelState + ", " + imagesDone + " images done, enhance " + enhanceState);
            summary["coordination"] = new Dictionary<string, object>
            {
                { "status", coordinated.Text("status") }, { "seeds", seeds }, { "model_state", modelState },
                { "images_done", imagesDone }, { "enhance", enhanceState }, { "domains", domainStates },
            };
            Console.WriteLine("coordination: model.load_model -> inference.batch_process -> postprocessing.enhance, "
                              + seeds.Count + " images in " + clock.ElapsedMilliseconds + " ms; status from "
                              + parts.Count + " domains");
            service.DeleteSessionAsync(coordinationId).Wait();
        }

        /// <summary>6. Bad input from C# is an envelope, never an exception.</summary>
        void BadInputIsAnEnvelope()
        {
            var missing = worker.GetSessionStatus(null);
            checks.That(!missing.Success && missing.ErrorCode == "invalid_request", "null id -> invalid_request");
            checks.That(worker.GetSessionStatus("").ErrorCode == "invalid_request", "empty id -> invalid_request");
            var unknown = worker.Execute("processing.teleport", new { });
            checks.That(unknown.ErrorCode == "invalid_request", "unknown command -> invalid_request");
            var wrongType = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic", priority = "high" });
            checks.That(wrongType.ErrorCode == "invalid_request", "priority \"high\" -> invalid_request");
            var nullParameters = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic",
                                                              parameters = (object)null, background = false });
            checks.That(nullParameters.Text("status") == "completed", "null parameters run with the defaults");
            Reply badShape;
            var none = worker.AllocateInput(-1, 32, out badShape);
            checks.That(none == null && badShape.ErrorCode == "invalid_request", "bad input shape -> invalid_request");
            var json = worker.ExecuteJson("get_session_status", "{not json");
            checks.That(json.Contains("\"invalid_request\""), "malformed JSON -> invalid_request");
        }

        /// <summary>7. A thread that calls while the worker closes gets `unavailable`, never an exception.</summary>
        void CloseWhileCalled(string sessionId)
        {
            int wrong = 0, refused = 0;
            bool stop = false;
            var caller = new Thread(() =>
            {
                while (!Volatile.Read(ref stop))
                {
                    var reply = worker.GetSessionStatus(sessionId);
                    if (!reply.Success && reply.ErrorCode == "unavailable") refused++;
                    else if (!reply.Success) wrong++;
                }
            });
            caller.Start();
            Thread.Sleep(50);
            var closedReply = worker.Close(TimeSpan.FromSeconds(30));
            Thread.Sleep(50);
            Volatile.Write(ref stop, true);
            caller.Join();
            checks.That(closedReply.Success && Equals(closedReply["threads_stopped"], true), "worker closed, threads joined");
            checks.That(wrong == 0 && refused > 0, "calls during and after close: " + refused + " unavailable, " + wrong + " other");
        }

        // ---- the board on the console, the PNGs on disk ---------------------------------------------

        BoardRow FollowOnBoard(int slot, string id)
        {
            BoardRow row = default(BoardRow);
            var hash = ProgressBoard.IdHash(id);
            string shown = null;
            while (true)
            {
                if (board.TryRead(slot, out row) && row.IdHash == hash)
                {
                    int filled = (int)(row.ProgressBp * 30 / 10000);
                    string bar = "  [" + new string('#', filled) + new string('.', 30 - filled) + "] "
                                 + (row.ProgressBp / 100).ToString().PadLeft(3) + "% " + (row.Status ?? "").PadRight(10)
                                 + (row.ItemsTotal > 0 ? row.ItemsDone + "/" + row.ItemsTotal + " items" : "");
                    if (bar != shown)  // redraw on change only: a redirected console gets a short log
                    {
                        string eta = row.EtaMs >= 0 ? " eta " + (row.EtaMs / 1000.0).ToString("F1") + "s" : "";
                        Console.Write((Console.IsOutputRedirected ? "\n" : "\r") + bar + eta + "   ");
                        shown = bar;
                    }
                    if (WorkStatus.IsFinal(row.Status)) break;
                }
                Thread.Sleep(25);
            }
            Console.WriteLine();
            return row;
        }

        void WaitForBoard(int slot, Func<BoardRow, bool> condition)
        {
            var deadline = DateTime.UtcNow.AddSeconds(60);
            BoardRow row;
            while (DateTime.UtcNow < deadline)
            {
                if (board.TryRead(slot, out row) && condition(row)) return;
                Thread.Sleep(2);
            }
            throw new TimeoutException("board slot " + slot + " never reached the expected state");
        }

        void WriteOutputs(IList<object> outputs, string stem, string workflowId, object parameters)
        {
            int index = 0;
            foreach (Reply output in outputs)
            {
                Reply error;
                using (var view = worker.GetOutput(output.Text("output_id"), out error))
                {
                    checks.That(view != null, "output readable: " + (error == null ? "" : error.Error));
                    if (view == null) continue;
                    checks.That(view.ReadOnly && view.Width == output.Number("width") && view.Height == output.Number("height"),
                                "output buffer matches its reference");
                    var path = Path.Combine(outputFolder, stem + "-" + index++ + "-seed" + output.Number("seed") + ".png");
                    PngWriter.Write(path, view);
                    files.Add(new Dictionary<string, object>
                    {
                        { "path", Path.GetFullPath(path) }, { "seed", output.Number("seed") },
                        { "width", (long)view.Width }, { "height", (long)view.Height },
                        { "workflow_id", workflowId }, { "stem", stem },
                        { "parameters", PlainParameters(parameters) },
                    });
                }
            }
        }

        static Dictionary<string, object> PlainParameters(object parameters)
        {
            var plain = new Dictionary<string, object>();
            foreach (var property in parameters.GetType().GetProperties())
            {
                var value = property.GetValue(parameters, null);
                plain[property.Name] = value is int ? (long)(int)value : value;
            }
            return plain;
        }
    }
}
