// The worker's Python log records, delivered to the host. A background thread
// drains the worker's bounded queue a few times a second (each drain is one
// short GIL hold) and hands every record to `sink`; records the queue had to
// drop are counted by the worker and reported here.
using System;
using System.Threading;

namespace EmbeddedWorker
{
    public sealed class LogPump : IDisposable
    {
        readonly EmbeddedProcessingWorker worker;
        readonly Action<Reply> sink;
        readonly Thread thread;
        readonly ManualResetEvent stopping = new ManualResetEvent(false);

        public long Delivered { get; private set; }
        public long Dropped { get; private set; }

        public LogPump(EmbeddedProcessingWorker worker, Action<Reply> sink, TimeSpan interval)
        {
            this.worker = worker;
            this.sink = sink;
            thread = new Thread(() =>
            {
                while (!stopping.WaitOne(interval)) Drain();
                Drain();
            }) { IsBackground = true, Name = "python-log-pump" };
            thread.Start();
            worker.Runtime.Track(this);
        }

        public void Drain()
        {
            var reply = worker.DrainLogs(500);
            if (!reply.Success) return;
            Dropped = reply.Number("dropped");
            foreach (var record in reply.List("records"))
            {
                sink((Reply)record);
                Delivered++;
            }
        }

        public void Dispose()
        {
            stopping.Set();
            if (Thread.CurrentThread != thread) thread.Join();
        }
    }
}
